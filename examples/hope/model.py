"""HOPE (self-modifying Titans + Continuum Memory System) and a Transformer++ baseline.

Read top to bottom (nanoGPT style):

1. ``HopeConfig`` / ``TransformerConfig``: every knob, with ablation switches.
2. ``SelfModifyingTitans``: the in-context part of a HOPE block (arXiv 2512.24695, Sec. 8). Per head, memories
   generate their own keys, values, write rates and retention from the (conv-mixed) input,
   ``k = M_k(x), v = M_v(x), eta = M_eta(x), alpha = M_alpha(x)``; ``q = x W_q`` is the only fixed
   projection; the output is ``y = M_mem(q)``. q, k and v are L2-normalized (v too: with
   self-generated values an unnormalized v makes the write factor ``alpha I + eta (v - k) k^T``
   expanding and the memories diverge within a few hundred tokens). Every memory writes with its own self-generated
   value ``v_hat = M(v)`` by delta-rule gradient descent with retention (weight decay) through
   ``deepopt.memory`` (``linear_memory_write`` / ``mlp_memory_write``, chunk-wise parallel,
   autograd-safe), starting from meta-learned initial states (``nn.Parameter``s); the retention
   of a linear memory decays it toward its initial state times a learned per-head gate
   (``anchor_init``), so that a memory streamed past its training window keeps the fixed point it
   was trained near. q and k are
   L2-normalized, a short causal depthwise conv (window 4) mixes neighbouring tokens first.
   Two chunk sizes as in the paper: the generator memories (k, v, eta, alpha) update every
   ``gen_chunk_size`` tokens, M_mem every ``chunk_size`` tokens.
3. ``CMS`` (``cms=True``): a chain of MLP levels after the Titans part; level l is trained with
   its own update period ``cms_periods[l]`` (``deepopt.MultiFrequency`` groups from
   :func:`hope_param_groups`), and keeps updating at that period at test time with ``--continual``.
   The default, ``cms=False``, is one period-1 MLP of the same total width: it measured better.
4. ``HOPE``: embedding -> blocks (Titans -> MLP, or the CMS chain) -> RMSNorm -> tied head.
5. ``Transformer``: Transformer++ (RoPE, SwiGLU, RMSNorm); :func:`matched_transformer_config`
   sizes its MLP so the parameter count matches a HOPE config.

Ablations: ``self_modifying=False`` replaces the generator memories by fixed linear projections
(and M_mem regresses the plain values v: a Titans/DeltaNet-style linear memory); ``cms=True``
replaces the single MLP by the CMS chain; ``anchor_init=None`` lets the linear memories decay
toward zero instead of toward their gated initial state. ``inner_momentum=beta``
writes each linear memory through a momentum of its inner steps (``S <- beta S + step``,
``M <- alpha M + S``; the paper's HOPE has it, and its "w/o momentum" ablation is beta = 0);
``inner_momentum_ema`` scales each step by ``1 - beta`` so that the total rate stays ``eta``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepopt.memory import linear_memory_read, linear_memory_write, mlp_memory_read, mlp_memory_write


# --------------------------------------------------------------------------- configs
@dataclass
class HopeConfig:
    vocab_size: int = 96
    block_size: int = 128            # training context (HOPE has no positional limit)
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    memory: str = "linear"           # "linear" | "mlp" (residual 2-layer MLP memories)
    memory_hidden: int = 32          # hidden width of MLP memories
    objective: str | None = None     # inner objective "dot" (DGD) | "l2"; None: dot for linear
                                     # memories, l2 for MLP ones (dot's Hebbian W1 write with
                                     # self-generated values diverges at init)
    chunk_size: int = 16             # M_mem chunk
    gen_chunk_size: int = 32         # chunk of the k/v/eta/alpha memories (multiple of chunk_size); 32
                                     # since 2026-12-07: 16 trains no better and 1.2x slower
                                     # (results/gen_chunk.json)
    conv_size: int = 4
    cms_periods: tuple = (1, 4, 16)  # update period of each CMS level (optimizer steps)
    cms_hidden: int = 192            # SwiGLU hidden width of each CMS level
    self_modifying: bool = True      # ablation switch
    cms: bool = False                # the CMS chain of cms_periods levels; False: one period-1 MLP of
                                     # the same total width, the default since 2026-12-06: the chain
                                     # lost to it in bits/char and in continual forgetting (docs/hope.md)
    eta_max: float = 1.0             # eta = eta_max * sigmoid(M_eta(x) + b)
    alpha_bias: float = 4.0          # initial retention ~ sigmoid(4) = 0.982
    inner_momentum: float = 0.0      # momentum beta of the linear memories' writes (0: none; the
                                     # paper's "w/o momentum" ablation is 0)
    inner_momentum_ema: bool = False # scale each step by 1 - beta (an EMA: the same total rate)
    anchor_init: float | None = 0.9  # retention toward the meta-learned initial state: a learned
                                     # per-head gate g in [0, 1] (starting here), the linear memories
                                     # decay toward g M_0 instead of 0; None: no gate (g = 0, the
                                     # memories before 2026-12-06). Linear memories only: None for mlp
    kind: str = "hope"


@dataclass
class TransformerConfig:
    vocab_size: int = 96
    block_size: int = 128
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    d_ff: int = 512
    rope_base: float = 10000.0
    window: int | None = None        # sliding-window attention: each token sees its last `window`
                                     # positions (itself included); None: full causal attention
    kind: str = "transformer"


def config_from_dict(d: dict):
    d = dict(d)
    cls = HopeConfig if d.get("kind", "hope") == "hope" else TransformerConfig
    if "cms_periods" in d:
        d["cms_periods"] = tuple(d["cms_periods"])
    if cls is HopeConfig:
        d.setdefault("anchor_init", None)   # a checkpoint from before the anchor gate has none
    return cls(**d)


# --------------------------------------------------------------------------- shared pieces
class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


def _heads(x, n_head):             # (B, T, D) -> (B, H, T, D/H)
    B, T, D = x.shape
    return x.view(B, T, n_head, D // n_head).transpose(1, 2)


def _merge(y):                     # (B, H, T, dh) -> (B, T, H*dh)
    B, H, T, dh = y.shape
    return y.transpose(1, 2).reshape(B, T, H * dh)


# --------------------------------------------------------------------------- HOPE
class SelfModifyingTitans(nn.Module):
    """Self-modifying Titans layer. State per sequence: the memories + the conv's last inputs."""

    def __init__(self, cfg: HopeConfig):
        super().__init__()
        self.cfg = cfg
        self.objective = cfg.objective or ("dot" if cfg.memory == "linear" else "l2")
        if cfg.inner_momentum and cfg.memory == "mlp":
            raise ValueError("inner_momentum is for linear memories (--memory linear)")
        if cfg.anchor_init is not None and not (cfg.memory == "linear" and 0.0 < cfg.anchor_init < 1.0):
            raise ValueError(f"anchor_init must lie in (0, 1) and is for linear memories (memory='linear'; "
                             f"pass anchor_init=None otherwise), got {cfg.anchor_init} with memory={cfg.memory!r}")
        D, H = cfg.n_embd, cfg.n_head
        dh = D // H
        self.dh = dh
        self.conv = nn.Conv1d(D, D, cfg.conv_size, groups=D, bias=True)   # causal via left pad
        self.w_q = nn.Linear(D, D, bias=False)                            # the only fixed projection
        self.w_o = nn.Linear(D, D, bias=False)
        self.b_eta = nn.Parameter(torch.zeros(H, 1))
        self.b_alpha = nn.Parameter(torch.full((H, 1), cfg.alpha_bias))
        eye = torch.eye(dh).expand(H, dh, dh)
        small = lambda *s: 0.02 * torch.randn(*s)
        mlp = cfg.memory == "mlp"
        if cfg.self_modifying:
            # meta-learned initial states of the generator memories
            if mlp:     # k and v: residual MLP memories; eta and alpha: linear (scalar outputs)
                self.kv_mlp_out = nn.Parameter(small(2, H, dh, cfg.memory_hidden))
                self.kv_mlp_in = nn.Parameter(torch.randn(2, H, cfg.memory_hidden, dh) / math.sqrt(dh))
                self.ea_init = nn.Parameter(small(H, 2, dh))
            else:       # rows [k (dh); v (dh); eta (1); alpha (1)] of one stacked linear memory
                self.gen_init = nn.Parameter(torch.cat([eye + small(H, dh, dh), eye + small(H, dh, dh),
                                                        small(H, 2, dh)], dim=1))
        else:
            self.w_kv = nn.Linear(D, 2 * D, bias=False)
            self.w_ea = nn.Linear(D, 2 * H, bias=False)
        if mlp:
            self.mem_mlp_out = nn.Parameter(small(H, dh, cfg.memory_hidden))
            self.mem_mlp_in = nn.Parameter(torch.randn(H, cfg.memory_hidden, dh) / math.sqrt(dh))
        else:
            self.mem_init = nn.Parameter(eye + small(H, dh, dh))
        if cfg.anchor_init is not None:   # logit of each linear memory's per-head anchor gate
            logit = math.log(cfg.anchor_init / (1 - cfg.anchor_init))
            self.anchor_logit = nn.ParameterDict({key: nn.Parameter(torch.full((H, 1, 1), logit))
                                                  for key in ("gen", "mem") if hasattr(self, f"{key}_init")})

    # -- state ---------------------------------------------------------------------------
    def initial_state(self, B):
        """Per-sequence copies of the meta-learned initial memories (gradients flow to them)."""
        cfg = self.cfg
        ex = lambda p: p.expand(B, *p.shape)
        st = {"conv": None}
        if cfg.self_modifying:
            if cfg.memory == "mlp":
                st["kv_mlp_out"] = self.kv_mlp_out[:, None].expand(2, B, *self.kv_mlp_out.shape[1:])
                st["kv_mlp_in"] = self.kv_mlp_in[:, None].expand(2, B, *self.kv_mlp_in.shape[1:])
                st["ea"] = ex(self.ea_init)
            else:
                st["gen"] = ex(self.gen_init)
        if cfg.memory == "mlp":
            st["mem_mlp_out"], st["mem_mlp_in"] = ex(self.mem_mlp_out), ex(self.mem_mlp_in)
        else:
            st["mem"] = ex(self.mem_init)
        if cfg.inner_momentum:   # each linear memory's momentum state starts at zero
            for key in [k for k in ("gen", "ea", "mem") if k in st]:
                st[f"{key}_momentum"] = torch.zeros_like(st[key])
        return st

    def _anchors(self):
        """Each linear memory's anchor, its gated initial state (computed once per forward)."""
        if self.cfg.anchor_init is None:
            return {}
        return {key: torch.sigmoid(logit) * getattr(self, f"{key}_init") for key, logit in self.anchor_logit.items()}

    def _linear_write(self, st, new, key, k, v, eta, alpha, q=None, anchors=None, **kw):
        """One linear memory's write, through its momentum state when it has one, its retention
        pulling toward the gated initial state when the model has the anchor gate."""
        if anchors and key in anchors:
            kw["anchor"] = anchors[key]
        if f"{key}_momentum" in st:
            if self.cfg.inner_momentum_ema:   # S is an EMA of the steps: the total rate stays eta
                eta = eta * (1 - self.cfg.inner_momentum)
            y, new[key], new[f"{key}_momentum"] = linear_memory_write(
                st[key], k, v, eta, alpha, q, momentum=self.cfg.inner_momentum, S=st[f"{key}_momentum"], **kw)
        else:
            y, new[key] = linear_memory_write(st[key], k, v, eta, alpha, q, **kw)
        return y

    # -- pieces --------------------------------------------------------------------------
    def _rates(self, eta_raw, alpha_raw):
        eta = self.cfg.eta_max * torch.sigmoid(eta_raw + self.b_eta)
        alpha = torch.sigmoid(alpha_raw + self.b_alpha)
        return eta, alpha

    def _generate(self, st, xh):
        """k, v, eta, alpha of a chunk from the chunk-start generator memories."""
        dh = self.dh
        if not self.cfg.self_modifying:
            return None
        if self.cfg.memory == "mlp":
            k = mlp_memory_read(st["kv_mlp_in"][0], st["kv_mlp_out"][0], xh)
            v = mlp_memory_read(st["kv_mlp_in"][1], st["kv_mlp_out"][1], xh)
            ea = linear_memory_read(st["ea"], xh)
            kv = F.normalize(torch.stack([k, v], dim=-2), dim=-1)
        else:
            out = linear_memory_read(st["gen"], xh)
            kv, ea = F.normalize(out[..., :2 * dh].unflatten(-1, (2, dh)), dim=-1), out[..., 2 * dh:]
        eta, alpha = self._rates(ea[..., 0], ea[..., 1])
        return kv[..., 0, :], kv[..., 1, :], eta, alpha     # k and v normalised in one call

    def _write_generators(self, st, k, v, eta, alpha, anchors):
        """Each generator memory writes its own value v_hat = M(v) (one chunk)."""
        cfg, new = self.cfg, dict(st)
        kw = dict(objective=self.objective, self_values=True)
        if cfg.memory == "mlp":
            ins, outs = [], []
            for i in range(2):
                _, mlp_in, mlp_out = mlp_memory_write(st["kv_mlp_in"][i], st["kv_mlp_out"][i], k, v, eta, alpha, **kw)
                ins.append(mlp_in)
                outs.append(mlp_out)
            new["kv_mlp_in"], new["kv_mlp_out"] = torch.stack(ins), torch.stack(outs)
            self._linear_write(st, new, "ea", k, v, eta, alpha, **kw)
        else:
            self._linear_write(st, new, "gen", k, v, eta, alpha, anchors=anchors, **kw)
        return new

    def _read_write_mem(self, st, q, k, v, eta, alpha, anchors):
        cfg, new = self.cfg, dict(st)
        kw = dict(chunk_size=cfg.chunk_size, objective=self.objective, self_values=cfg.self_modifying)
        if cfg.memory == "mlp":
            y, new["mem_mlp_in"], new["mem_mlp_out"] = mlp_memory_write(st["mem_mlp_in"], st["mem_mlp_out"], k, v,
                                                                        eta, alpha, q, **kw)
        else:
            y = self._linear_write(st, new, "mem", k, v, eta, alpha, q, anchors=anchors, **kw)
        return y, new

    def forward(self, x, state=None):
        cfg, H = self.cfg, self.cfg.n_head
        B, T, D = x.shape
        st = self.initial_state(B) if state is None else state
        # short causal depthwise conv; the cache holds the previous call's last inputs
        pad = st["conv"] if st["conv"] is not None else x.new_zeros(B, cfg.conv_size - 1, D)
        xp = torch.cat([pad, x], dim=1)
        # contiguous channels-first: the depthwise conv's backward on a transposed view is ~2x slower
        xc = self.conv(xp.transpose(1, 2).contiguous()).transpose(1, 2)
        q = F.normalize(_heads(self.w_q(xc), H), dim=-1)
        xh = _heads(xc, H)
        anchors = self._anchors()
        if not cfg.self_modifying:
            kv = _heads(self.w_kv(xc), 2 * H)
            k_all, v_all = F.normalize(kv[:, :H], dim=-1), F.normalize(kv[:, H:], dim=-1)
            ea = self.w_ea(xc).view(B, T, H, 2).permute(0, 2, 1, 3)
            eta_all, alpha_all = self._rates(ea[..., 0], ea[..., 1])
        if cfg.self_modifying:
            # the generators make their own k, v, eta, alpha, so their recurrence is nonlinear: chunk
            # by chunk (split, not sliced: a slice's backward writes a zero tensor of the whole
            # sequence, T/G of them would cost O(T^2))
            made = []
            for xh_chunk in xh.split(cfg.gen_chunk_size, dim=2):
                k, v, eta, alpha = self._generate(st, xh_chunk)
                st = self._write_generators(st, k, v, eta, alpha, anchors)
                made.append((k, v, eta, alpha))
            k_all, v_all, eta_all, alpha_all = (torch.cat(parts, dim=2) for parts in zip(*made))
        # M_mem's write is affine in its state given k, v, eta, alpha: one call over the whole
        # sequence (deepopt.memory composes the chunks' maps at once)
        y, st = self._read_write_mem(st, q, k_all, v_all, eta_all, alpha_all, anchors)
        y = F.rms_norm(y, (self.dh,))                    # per-head output norm
        st = dict(st)
        st["conv"] = xp[:, -(cfg.conv_size - 1):] if cfg.conv_size > 1 else None
        return self.w_o(_merge(y)), st


class CMS(nn.Module):
    """Continuum Memory System: a chain of MLP levels, level l updated every periods[l] steps."""

    def __init__(self, dim, hidden, periods):
        super().__init__()
        self.periods = tuple(int(p) for p in periods)
        self.norms = nn.ModuleList([RMSNorm(dim) for _ in self.periods])
        self.levels = nn.ModuleList([SwiGLU(dim, hidden) for _ in self.periods])

    def forward(self, x):
        for norm, mlp in zip(self.norms, self.levels):
            x = x + mlp(norm(x))
        return x


class HopeBlock(nn.Module):
    def __init__(self, cfg: HopeConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.n_embd)
        self.titans = SelfModifyingTitans(cfg)
        if cfg.cms:
            self.cms = CMS(cfg.n_embd, cfg.cms_hidden, cfg.cms_periods)
        else:   # ablation: one ordinary MLP of the same total width
            self.cms = CMS(cfg.n_embd, cfg.cms_hidden * len(cfg.cms_periods), (1,))

    def forward(self, x, state=None):
        h, state = self.titans(self.norm(x), state)
        return self.cms(x + h), state


class HOPE(nn.Module):
    def __init__(self, cfg: HopeConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head or cfg.gen_chunk_size % cfg.chunk_size:
            raise ValueError(f"n_embd must divide by n_head and gen_chunk_size by chunk_size, got n_embd="
                             f"{cfg.n_embd}, n_head={cfg.n_head}, gen_chunk_size={cfg.gen_chunk_size}, "
                             f"chunk_size={cfg.chunk_size}")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList([HopeBlock(cfg) for _ in range(cfg.n_layer)])
        self.norm_f = RMSNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        _init_weights(self, cfg.n_layer)

    def forward(self, idx, targets=None, state=None, return_state=False):
        """``state``: list of per-block memory states from a previous call (streaming)."""
        x = self.wte(idx)
        if state is not None:
            self.check_state(state, idx.shape[0], x.dtype)
        new_states = []
        for i, block in enumerate(self.blocks):
            x, st = block(x, None if state is None else state[i])
            new_states.append(st)
        logits = self.lm_head(self.norm_f(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return (logits, loss, new_states) if return_state else (logits, loss)

    def check_state(self, state, batch: int, dtype: torch.dtype) -> None:
        """A state from another model, batch size or dtype raises a one-line ``ValueError``
        naming the expected and the given shape (or dtype), before any memory is read."""
        if not isinstance(state, (list, tuple)) or len(state) != len(self.blocks):
            raise ValueError(f"state: expected a list of {len(self.blocks)} block states (model.forward(..., "
                             f"return_state=True)), got {type(state).__name__} of length "
                             f"{len(state) if hasattr(state, '__len__') else '?'}")
        for i, (block, given) in enumerate(zip(self.blocks, state)):
            want = block.titans.initial_state(batch)
            want["conv"] = torch.empty(batch, self.cfg.conv_size - 1, self.cfg.n_embd) if self.cfg.conv_size > 1 else None
            if not isinstance(given, dict) or set(given) != set(want):
                keys = sorted(given) if isinstance(given, dict) else type(given).__name__
                raise ValueError(f"state of block {i}: keys {keys} do not match this model's {sorted(want)}")
            for key, w in want.items():
                g = given[key]
                if (w is None) != (g is None) or (w is not None and tuple(g.shape) != tuple(w.shape)):
                    shape = None if g is None else tuple(g.shape)
                    raise ValueError(f"state of block {i}, {key!r}: shape {shape} does not match this model at "
                                     f"batch size {batch}: expected {None if w is None else tuple(w.shape)}")
                if g is not None and g.dtype != dtype:
                    raise ValueError(f"state of block {i}, {key!r}: dtype {g.dtype} does not match the model's "
                                     f"{dtype}")

    def cms_levels(self):
        """[(period, [params])] of the CMS levels over all blocks (one entry per level)."""
        out = []
        for l, period in enumerate(self.blocks[0].cms.periods):
            ps = []
            for b in self.blocks:
                ps += list(b.cms.levels[l].parameters()) + list(b.cms.norms[l].parameters())
            out.append((period, ps))
        return out

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        return _generate(self, idx, max_new_tokens, temperature, top_k, crop=None)


#: the batch dim of each state key (the generator MLPs stack their two memories first)
_STATE_BATCH_DIM = {"kv_mlp_in": 1, "kv_mlp_out": 1}


def reset_state(model, state, rows):
    """``state`` with the ``rows`` (a ``(B,)`` bool mask) back at the model's initial state: the
    meta-learned memories, zero momentum, an empty conv cache. Gradients still reach the
    initial states through the reset rows."""
    out = []
    for block, st in zip(model.blocks, state):
        B = rows.shape[0]
        init = block.titans.initial_state(B)
        new = {}
        for key, value in st.items():
            if value is None:
                new[key] = None
                continue
            start = init.get(key)
            start = torch.zeros_like(value) if start is None else start.to(value.dtype)
            dim = _STATE_BATCH_DIM.get(key, 0)
            mask = rows.to(value.device).view(*([1] * dim), B, *([1] * (value.ndim - dim - 1)))
            new[key] = torch.where(mask, start, value)
        out.append(new)
    return out


def detach_state(state):
    return [{k: (v.detach() if torch.is_tensor(v) else v) for k, v in st.items()} for st in state]


# --------------------------------------------------------------------------- Transformer++
def _rope(x, base):
    """Rotary position embedding on (B, H, T, dh)."""
    T, dh = x.shape[-2], x.shape[-1]
    inv = base ** (-torch.arange(0, dh, 2, device=x.device, dtype=torch.float32) / dh)
    ang = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * inv
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.w_qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.w_o = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x):
        H = self.cfg.n_head
        q, k, v = self.w_qkv(x).split(x.shape[-1], dim=-1)
        q, k, v = _heads(q, H), _heads(k, H), _heads(v, H)
        q, k = _rope(q, self.cfg.rope_base), _rope(k, self.cfg.rope_base)
        T, w = x.shape[1], self.cfg.window
        if w is None or w >= T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            gap = torch.arange(T, device=x.device)[:, None] - torch.arange(T, device=x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=(gap >= 0) & (gap < w))
        return self.w_o(_merge(y))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(cfg.n_embd), RMSNorm(cfg.n_embd)
        self.attn = Attention(cfg)
        self.mlp = SwiGLU(cfg.n_embd, cfg.d_ff)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_layer)])
        self.norm_f = RMSNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        _init_weights(self, cfg.n_layer)

    def forward(self, idx, targets=None, state=None, return_state=False):
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.norm_f(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return (logits, loss, None) if return_state else (logits, loss)

    def cms_levels(self):
        return []

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        return _generate(self, idx, max_new_tokens, temperature, top_k, crop=self.cfg.block_size)


# --------------------------------------------------------------------------- helpers
def _init_weights(model, n_layer):
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("w_o", "w_down")) else 0.02
            nn.init.normal_(m.weight, 0.0, std)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)


def _generate(model, idx, max_new_tokens, temperature, top_k, crop):
    for _ in range(max_new_tokens):
        ctx = idx if crop is None else idx[:, -crop:]
        logits = model(ctx)[0][:, -1] / temperature
        if top_k is not None:
            v, _ = torch.topk(logits, min(top_k, logits.shape[-1]))
            logits[logits < v[:, [-1]]] = -float("inf")
        idx = torch.cat([idx, torch.multinomial(F.softmax(logits, -1), 1)], dim=1)
    return idx


def build_model(cfg):
    return HOPE(cfg) if isinstance(cfg, HopeConfig) else Transformer(cfg)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def matched_transformer_config(hcfg: HopeConfig, **overrides) -> TransformerConfig:
    """Transformer++ with HOPE's width/depth/heads and the SwiGLU width that matches its size."""
    target = count_params(HOPE(hcfg))
    base = dict(vocab_size=hcfg.vocab_size, block_size=hcfg.block_size, n_layer=hcfg.n_layer,
                n_embd=hcfg.n_embd, n_head=hcfg.n_head)
    base.update(overrides)
    D, L, V = base["n_embd"], base["n_layer"], base["vocab_size"]
    fixed = V * D + D + L * (4 * D * D + 2 * D)            # embedding, final norm, attention, norms
    d_ff = max(8, round((target - fixed) / (3 * D * L)))
    return TransformerConfig(d_ff=d_ff, **base)


def hope_param_groups(model, **group_options):
    """Param groups: one per CMS level with ``update_every=period``, one for the rest
    (``update_every=1``), for ``deepopt.MultiFrequency``."""
    levels = model.cms_levels()
    in_levels = {id(p) for _, ps in levels for p in ps}
    rest = [p for p in model.parameters() if id(p) not in in_levels]
    groups = [dict(params=rest, update_every=1, name="base", **group_options)]
    for l, (period, ps) in enumerate(levels):
        groups.append(dict(params=ps, update_every=period, name=f"cms{l}", **group_options))
    return groups
