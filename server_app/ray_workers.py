"""Replace a simulation worker that died instead of handing its jobs to a dead actor.

Flower 1.42's Ray backend puts the actor of a failed job back into its pool whatever the
failure; when the actor process itself died (out of memory, killed), every later job sent to
it fails too, so with 3 nodes on 3 workers 2 of 3 nodes fail every round from then on. This
wraps `RayBackend.process_message`: on `RayActorError` the dead actor is dropped and a new one
created in its place; the failing message still fails (its node misses that round, which the
coordinator's quorum handles). Applied by the ServerApp, which runs in the simulation process.
"""

from __future__ import annotations

import logging

log = logging.getLogger("spes.sim")
_PATCHED = "_spes_replaces_dead_actors"


def replace_dead_actors() -> bool:
    """Patch Flower's Ray backend once; False where the simulation extra is not installed."""
    try:
        import ray
        from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
    except ImportError:
        return False
    if getattr(RayBackend, _PATCHED, False):
        return True
    original = RayBackend.process_message

    def process_message(self, message, context):
        try:
            return original(self, message, context)
        except ray.exceptions.RayActorError:
            if self.pool is not None:  # Flower already put the dead actor back: swap it out
                _swap_dead_actors(self.pool)
            raise

    RayBackend.process_message = process_message
    setattr(RayBackend, _PATCHED, True)
    return True


def _swap_dead_actors(pool) -> None:
    """Replace each idle actor that no longer answers (other threads may be taking actors meanwhile)."""
    import ray

    for actor in list(pool.pool):
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=10)
        except Exception:  # RayActorError, or no answer: the worker is gone
            try:
                pool.pool.remove(actor)
            except ValueError:
                continue  # another thread took it meanwhile; its own failure will swap it
            log.warning("simulation worker %s died; starting a replacement", actor)
            pool.pool.append(pool.create_actor_fn())
