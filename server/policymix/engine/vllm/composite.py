"""``MixturePolicyForCausalLM``: every policy of a family as one vLLM model, mixed in ``compute_logits``.

One sub-model per policy (its class found through vLLM's model registry from its own HF config),
built from a shallow copy of the engine's ``VllmConfig`` whose ``model_config`` points at that
policy, so all sub-models share the compilation and cache configs: their attention layers land
in one KV-cache group with one block table, and vLLM's scheduler, paged cache and prefix cache
serve them all. Each sub-model is an attribute named with letters (``pol_a``...).

``forward`` runs every sub-model on the same tokens and returns their hidden states side by side
``[T, sum H_k]``; ``compute_logits`` splits them and returns the mixed raw logits
``sum_k w_k * l_k[:V]`` per row (the native engine's score: the same q as ``sum_k w_k log pi_k``, and
vLLM's repetition penalty then reads raw logits as it does for one model), with each row's weights
from the weight table (:mod:`.table`). Later calls of a step are vLLM's prompt-logprob pass: one
request's prompt rows, mixed with that request's weights (``_prompt_request``).

Tensor parallelism is vLLM's inside each sub-model (each ``compute_logits`` all-gathers its
vocabulary shards, so every worker mixes full rows). Pipeline stages (``SupportsPP``) split every
sub-model's layers alike; a stage hands the next one all policies' intermediate tensors packed into
one tensor (``_pack``), and only the last stage computes logits.

Policies that no request of the current batch uses are skipped, in ``compute_logits`` always and
in ``forward`` when no CUDA graph is captured (a graph replays every sub-model). Their KV cache is
then not written for those tokens, which is safe because every request's prefix-cache key is
salted with the set of policies it uses (see ``engine.py``): blocks are shared only between
requests that ran the same policies on them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.backends import set_model_tag
from vllm.config import ModelConfig, VllmConfig
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.model_loader.utils import initialize_model
from vllm.model_executor.models import ModelRegistry
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.sequence import IntermediateTensors

from .checkpoint import PLACEHOLDER
from .plugin import POLICIES_KEY
from .table import published

PACKED = "policymix_stage"  # the one intermediate tensor between pipeline stages: [T, sum of policies' widths]


def _sub_config(parent: VllmConfig, path: str) -> VllmConfig:
    """The engine's config with ``model_config`` pointing at one policy (everything else shared)."""
    pm = parent.model_config
    mc = ModelConfig(model=path, tokenizer=pm.tokenizer, skip_tokenizer_init=True, dtype=pm.dtype,
                     max_model_len=pm.max_model_len, enforce_eager=pm.enforce_eager, seed=pm.seed,
                     trust_remote_code=pm.trust_remote_code, generation_config="vllm")
    sub = copy.copy(parent)
    sub.model_config = mc
    return sub


class MixturePolicyForCausalLM(nn.Module, SupportsPP):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        hf = vllm_config.model_config.hf_config
        self.members = [dict(m) for m in getattr(hf, POLICIES_KEY)]
        self.key = vllm_config.model_config.model
        self.vocab = int(hf.vocab_size)
        graphs = getattr(vllm_config.compilation_config, "cudagraph_mode", None)
        # a CUDA graph captured at start replays every sub-model; skip only where nothing is captured
        self.skip_unused = vllm_config.model_config.enforce_eager or graphs is None or graphs.name == "NONE"
        # pipeline stages: every stage passes every policy's tensors on, so every sub-model runs
        self.staged = vllm_config.parallel_config.pipeline_parallel_size > 1
        self.skip_unused = self.skip_unused and not self.staged
        self.secondary_weights = []
        self.hidden_sizes: list[int] = []
        for m in self.members:
            sub_cfg = _sub_config(vllm_config, m["path"])
            mc = sub_cfg.model_config
            cls, _ = ModelRegistry.resolve_model_cls(mc.hf_config.architectures, model_config=mc)
            name = f"{prefix}.{m['attr']}" if prefix else m["attr"]
            with set_model_tag(m["attr"]):
                sub = initialize_model(sub_cfg, prefix=name, model_class=cls, model_config=mc)
            self.add_module(m["attr"], sub)
            self.hidden_sizes.append(int(mc.get_hidden_size()))
            self.secondary_weights.append(DefaultModelLoader.Source(m["path"], None, prefix=f"{m['attr']}."))

    def _subs(self) -> list[nn.Module]:
        return [getattr(self, m["attr"]) for m in self.members]

    # ----- pipeline stages: every policy's intermediate tensors travel as one packed tensor -----
    # (vLLM's CPU shared-memory channel carries at most 8 tensors per send; K policies have 2K)

    def _stage_layout(self) -> list[tuple[str, str, int]]:
        """(policy attr, tensor name, width) of each packed column block, in order."""
        if getattr(self, "_layout", None) is None:
            meta = torch.device("meta")
            self._layout = [(m["attr"], name, int(t.shape[-1])) for m, sub in zip(self.members, self._subs())
                            for name, t in sub.make_empty_intermediate_tensors(1, torch.float32, meta).items()]
        return self._layout

    def make_empty_intermediate_tensors(self, batch_size: int, dtype: torch.dtype,
                                        device: torch.device) -> IntermediateTensors:
        width = sum(w for _, _, w in self._stage_layout())
        return IntermediateTensors({PACKED: torch.zeros(batch_size, width, dtype=dtype, device=device)})

    def _pack(self, outs: list[IntermediateTensors]) -> IntermediateTensors:
        by_attr = {m["attr"]: o for m, o in zip(self.members, outs)}
        parts = [by_attr[attr][name] for attr, name, _ in self._stage_layout()]
        return IntermediateTensors({PACKED: torch.cat(parts, dim=-1)})  # [T, sum of widths]

    def _unpack(self, packed: IntermediateTensors | None) -> dict[str, IntermediateTensors | None]:
        if packed is None:
            return {m["attr"]: None for m in self.members}
        layout = self._stage_layout()
        cols = packed[PACKED].split([w for _, _, w in layout], dim=-1)
        out: dict[str, IntermediateTensors] = {}
        for (attr, name, _), col in zip(layout, cols):
            out.setdefault(attr, IntermediateTensors({}))[name] = col.contiguous()
        return out

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("each policy embeds the tokens itself; the composite has no shared embedding")

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        table = published(self.key)
        live = self.skip_unused and table is not None and table.num_reqs > 0  # else warm-up: run them all
        run = table.used if live else [True] * len(self.members)
        given = self._unpack(intermediate_tensors) if self.staged else {}
        outs = [sub(input_ids, positions, given.get(m["attr"]), inputs_embeds) if run[k] else None
                for k, (m, sub) in enumerate(zip(self.members, self._subs()))]
        if isinstance(outs[0], IntermediateTensors):  # not the last pipeline stage: hand every policy's on
            return self._pack(outs)
        some = next(o for o in outs if o is not None)
        outs = [o if o is not None else some.new_zeros(some.shape[0], h) for o, h in zip(outs, self.hidden_sizes)]
        hidden = torch.cat(outs, dim=-1)  # [T, sum H_k]; zeros for a skipped policy
        self._last = (hidden, _query_starts(), 0, set())  # prompt logprobs: whose prompt rows a later call scores
        return hidden

    def _prompt_request(self, hidden_states: torch.Tensor) -> int | None:
        """The batch index of the request whose prompt positions ``hidden_states`` holds, for vLLM's
        prompt-logprob pass. The model runner first calls ``compute_logits`` on the rows it samples; calls
        after that, until the next forward, are that pass: one request at a time, a copy of the rows from
        its first scheduled token on (found by content at each request's ``query_start_loc``)."""
        hidden, starts, calls, taken = getattr(self, "_last", (None, None, 0, set()))
        self._last = (hidden, starts, calls + 1, taken)
        table = published(self.key)
        if hidden is None or starts is None or calls == 0 or table is None:
            return None
        rows = hidden_states.shape[0]
        for i, st in enumerate(starts.tolist()[: table.num_reqs]):
            # requests that asked for prompt logprobs, each once per step (identical prompts: in batch order)
            if i in taken or not table.prompt_rows[i] or st + rows > hidden.shape[0]:
                continue
            if torch.equal(hidden[st : st + rows], hidden_states):
                taken.add(i)
                return i
        return None

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        rows = hidden_states.shape[0]
        table = published(self.key)
        prompt_of = self._prompt_request(hidden_states) if table is not None else None
        live = table is not None and (prompt_of is not None or table.num_reqs == rows)  # else warm-up, profiling
        if prompt_of is not None:  # every row is a prompt position of one request: its weights
            weights = table.weights[prompt_of : prompt_of + 1].expand(rows, -1)
        elif live:
            weights = table.weights[:rows]  # [B, K]
        else:
            weights = hidden_states.new_zeros(rows, len(self.members))
        used = table.used if live else [True] * len(self.members)
        watching = live and prompt_of is None and table.watching
        mixed = None
        logps: dict[int, torch.Tensor] = {}  # per-policy log-probs, only for watched rows' signals
        parts = hidden_states.split(self.hidden_sizes, dim=-1)
        for k, (sub, h) in enumerate(zip(self._subs(), parts)):
            if not used[k]:
                continue
            logits = sub.compute_logits(h)  # [B, V_k]; None on tensor-parallel ranks > 0
            if logits is None:
                return None
            logits = logits[:, : self.vocab].float()  # [B, V]
            if watching:
                logps[k] = torch.log_softmax(logits, dim=-1)
            # raw logits, as the native engine mixes: sum_k w_k l_k differs from sum_k w_k log pi_k by a
            # constant per row, so q and logprobs are the same, and repetition_penalty sees raw logits
            w = weights[:, k : k + 1]  # [B, 1]
            term = torch.where(w != 0, w * logits, 0.0)  # a weight of 0 never meets a -inf
            mixed = term if mixed is None else mixed.add_(term)
        if mixed is None:
            mixed = hidden_states.new_zeros(rows, self.vocab, dtype=torch.float32)
        if watching:  # per-policy logprobs of the tokens about to be sampled (table.py)
            table.keep(logps, mixed.clone())
        return mixed  # [B, V]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Stream each prefixed checkpoint tensor to its sub-model; returns the prefixed names loaded.

        The loader yields one policy's tensors after another, so each sub-model gets a generator
        over its own run of tensors (nothing is buffered: a large policy is never held twice).
        """
        subs = {m["attr"]: getattr(self, m["attr"]) for m in self.members}
        source = iter(weights)

        def advance():
            for name, tensor in source:
                if name == PLACEHOLDER:
                    continue
                attr, _, rest = name.partition(".")
                if attr not in subs:
                    raise ValueError(f"unexpected checkpoint tensor {name!r} in the composite model")
                return attr, (rest, tensor)
            return None

        loaded: set[str] = set()
        pending = advance()
        while pending is not None:
            attr = pending[0]

            def run():
                nonlocal pending
                while pending is not None and pending[0] == attr:
                    item = pending[1]
                    pending = advance()
                    yield item

            names = subs[attr].load_weights(run())
            loaded.update(f"{attr}.{n}" for n in (names or ()))
            while pending is not None and pending[0] == attr:  # whatever the sub-model did not read
                pending = advance()
        return loaded


def _query_starts() -> torch.Tensor | None:
    """The current forward's per-request token offsets (vLLM's ``query_start_loc``), if an attention
    backend publishes them."""
    try:
        from vllm.forward_context import get_forward_context

        metadata = get_forward_context().attn_metadata
    except Exception:  # noqa: BLE001 - no forward context (a warm-up or profiling run)
        return None
    if isinstance(metadata, list):
        metadata = metadata[0] if metadata else None
    for m in (metadata or {}).values():
        starts = getattr(m, "query_start_loc", None)
        if starts is not None:
            return starts
    return None
