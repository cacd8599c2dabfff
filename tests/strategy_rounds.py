"""One SPES round through the real strategy and real node rounds, without Flower's runtime.

Node i of a test is Flower node id 10 + i. Shared by the tests that drive several rounds this way.
"""

from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from client_app import background_save
from client_app.local_round import DeltaDownlink, NeedsFullModel, RoundOrder, run_local_round
from common import keys
from common.codec import decode, encode, to_record


def play_round(s, rnd, ctxs, tamper=None, fail=()):
    """Configure, train every addressed node, aggregate; returns (messages, {partition: (reply, metrics)}).

    `tamper(partition, reply)` may replace a reply before it is sent (the sent dict keeps the
    original). A node that cannot continue (NeedsFullModel), or is listed in `fail` (it lost its
    state), replies with an error, as the ClientApp's exception does through Flower."""
    msgs = list(s.configure_train(rnd, None, ConfigRecord({}), None))
    replies, sent = [], {}
    for msg in msgs:
        ctx = ctxs[msg.metadata.dst_node_id - 10]
        cfg = msg.content["config"]
        delta = None
        if s.sync is not None:
            delta = DeltaDownlink(msg.content["arrays"], cfg[keys.BASE_STEP], cfg[keys.APPLY_OWN])
        try:
            if ctx.partition_id in fail:
                raise NeedsFullModel("lost")
            order = RoundOrder(
                list(cfg[keys.OWNED_EXPERTS]),
                bool(cfg[keys.FULL_MODEL]),
                cfg[keys.GLOBAL_STEP],
                cfg[keys.LOCAL_STEPS],
                delta=delta,
                fragment=cfg.get(keys.SYNC_FRAGMENT),
                absent=_absent(cfg.get(keys.ABSENT_EXPERTS), ctx.spec.model.num_experts),
            )
            reply, metrics = run_local_round(
                ctx, {} if delta else decode(msg.content["arrays"]), order, show_progress=False
            )
        except NeedsFullModel as exc:
            replies.append(Message(Error(code=1, reason=str(exc)), reply_to=msg))
            continue
        sent[ctx.partition_id] = (reply, metrics)
        if tamper is not None:
            reply = tamper(ctx.partition_id, reply)
        record = to_record(reply) if delta else encode(reply)
        replies.append(Message(RecordDict({"arrays": record, "metrics": MetricRecord(metrics)}), reply_to=msg))
    s.aggregate_train(rnd, replies)
    # Node states are written after the reply (train.save_in_background); the next round waits for
    # them by itself, but these tests also read and delete them directly.
    background_save.drain()
    return msgs, sent


def _absent(mask, num_experts: int) -> list[list[int]]:
    """The per-layer absent experts of a flat [layers x experts] mask, as the train handler reads it."""
    if mask is None:
        return []
    rows = [mask[i : i + num_experts] for i in range(0, len(mask), num_experts)]
    return [[e for e, bit in enumerate(row) if bit] for row in rows]
