"""Next-token cross-entropy, plain or memory-lean (never the fp32 logits of the whole batch).

The plain path materialises logits [tokens, vocab] (bf16 under autocast), their fp32 copy and
the softmax gradient: at the reference vocabulary (151,665) and 4 x 2048 tokens that is about
5 GB per fp32 copy. The lean path goes hidden -> lm_head -> CE a chunk of tokens at a time and
computes the chunk's gradients right away (hidden and lm_head weight), so only one chunk's
logits ever exist. On CUDA, liger-kernel's fused linear cross-entropy does the same in Triton
when it is installed (`pip install 'spes-flower[gpu]'`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

# Logit elements per chunk: 1024 tokens at the reference vocabulary (151,665) = 0.62 GB in fp32,
# still large enough a GEMM to run at full speed; small vocabularies get more tokens per chunk.
_CHUNK_LOGITS = 1024 * 151_665
IGNORE_INDEX = -100


def _liger_loss():
    with contextlib.suppress(ImportError):
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")
    return None


class _ChunkedLinearCE(torch.autograd.Function):
    """(mean CE, mean squared log-partition) of hidden @ weight.T, gradients computed chunk by
    chunk in the forward; the z-loss and its gradients only when `with_z`."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, compute_dtype, with_z):
        n = hidden.shape[0]
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp_min(1)
        w = weight.to(compute_dtype)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        terms = ("ce", "z") if with_z else ("ce",)
        grad_h = {k: torch.empty_like(hidden) for k in terms} if want_h else {}
        grad_w = {k: torch.zeros_like(weight, dtype=torch.float32) for k in terms} if want_w else {}
        ce = torch.zeros((), dtype=torch.float32, device=hidden.device)
        z = torch.zeros_like(ce)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            h, t, ok = hidden[rows].to(compute_dtype), targets[rows].clamp_min(0)[:, None], valid[rows].float()
            logits = F.linear(h, w).float()
            lse = torch.logsumexp(logits, dim=-1)
            ce += ((lse - logits.gather(1, t).squeeze(1)) * ok).sum()
            z += lse.pow(2).sum()
            if not (want_h or want_w):
                continue
            probs = logits.sub_(lse[:, None]).exp_()
            # d(mean CE)/d logits = (softmax - onehot(target)) / count, zero on ignored rows;
            # d(mean lse^2)/d logits = 2 lse softmax / n.
            grads = {}
            if with_z:
                grads["z"] = (probs * (2 * lse / n)[:, None]).to(compute_dtype)
            probs.scatter_add_(1, t, -torch.ones_like(lse)[:, None]).mul_((ok / count)[:, None])
            grads["ce"] = probs.to(compute_dtype)
            del probs, logits
            for k, g in grads.items():
                if want_h:
                    grad_h[k][rows] = (g @ w).to(hidden.dtype)
                if want_w:
                    grad_w[k].add_(g.t() @ h)
        ctx.weight_dtype = weight.dtype
        ctx.terms = terms
        ctx.save_for_backward(*grad_h.values(), *grad_w.values())
        ctx.has = (want_h, want_w)
        return ce / count, z / n

    @staticmethod
    def backward(ctx, grad_ce, grad_z):
        saved, k = list(ctx.saved_tensors), len(ctx.terms)
        want_h, want_w = ctx.has
        gh_parts = saved[:k] if want_h else []
        gw_parts = saved[k if want_h else 0 :] if want_w else []
        scales = (grad_ce, grad_z)[:k]
        gh = sum(g * s for g, s in zip(gh_parts, scales)) if want_h else None
        gw = sum(g * s for g, s in zip(gw_parts, scales)).to(ctx.weight_dtype) if want_w else None
        return gh, gw, None, None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int | None = None,
    with_z: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean CE, logit z-loss) of `hidden [N, H] @ weight[V, H].T` against `targets [N]` (-100
    ignored), a chunk of tokens at a time. The z-loss (mean squared logsumexp over all rows) is
    differentiable only with `with_z`. Matmuls run in the autocast dtype when autocast is on
    (as lm_head would), the softmax in fp32.
    """
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    chunk = chunk or max(1, _CHUNK_LOGITS // weight.shape[0])
    with torch.autocast(device, enabled=False):
        ce, z = _ChunkedLinearCE.apply(hidden, weight, targets, chunk, dtype, with_z)
    return ce, (z if with_z else z.detach())


def lean_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, with_z: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(CE, logit z-loss or None): liger's fused linear CE on CUDA when installed and no z-loss
    is asked for, else the chunked version; hidden [..., H]."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if hidden.is_cuda and not with_z:
        liger = _liger_loss()
        if liger is not None:
            dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else hidden.dtype
            return liger(weight.to(dtype), hidden.to(dtype), targets).float(), None
    ce, z = chunked_linear_cross_entropy(hidden, weight, targets, with_z=with_z)
    return ce, (z if with_z else None)


def forward_ce(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    output_router_logits: bool,
    lean: bool = False,
    logit_z: bool = False,
):
    """Run the causal LM and its next-token CE: (model output with router_logits, ce, logit z-loss).

    The logit z-loss (mean squared logsumexp of the output logits) is None unless `logit_z`.
    lean=True calls the decoder without its lm_head and computes both from the last hidden
    state a chunk at a time (`lean_cross_entropy`); the output then has no `logits`.
    """
    if not lean:
        out = model(input_ids=inputs, output_router_logits=output_router_logits, use_cache=False)
        logits = out.logits
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return out, ce, (torch.logsumexp(logits.float(), dim=-1).pow(2).mean() if logit_z else None)
    out = model.model(input_ids=inputs, output_router_logits=output_router_logits, use_cache=False)
    ce, z = lean_cross_entropy(out.last_hidden_state, model.lm_head.weight, targets, with_z=logit_z)
    return out, ce, z
