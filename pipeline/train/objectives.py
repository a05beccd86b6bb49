"""Training objectives, chosen by the model family: the loop calls `objective.loss` and nothing else.

Every objective takes a batch of token windows [batch, seq_len + 1] and a CPU torch.Generator for
any randomness (masking, span corruption). The loop seeds that generator from (seed, step, rank,
micro step), so the randomness is replayed exactly on resume.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from pipeline.engine.errors import PipelineError

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100  # label of positions that take no part in the loss


class Objective(Protocol):
    """What the pretrain loop needs from a model family's objective."""

    name: str

    def loss(
        self, model: torch.nn.Module, tokens: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(mean loss to backpropagate, extra metrics to log) for `tokens` [batch, seq_len + 1]."""
        ...


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean float32 cross-entropy of logits [B, L, V] against labels [B, L], skipping IGNORE_INDEX."""
    import torch.nn.functional as F

    return F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX
    )


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of scored positions (labels != IGNORE_INDEX) where the argmax is the label."""
    scored = labels != IGNORE_INDEX  # [B, L]
    return (logits.argmax(-1)[scored] == labels[scored]).float().mean().detach()


def document_positions(inputs: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Each token's position within its document, restarting right after every eos: [B, T].

    A row starts mid-document, so its first document counts from 0 at the row's start.
    """
    import torch

    index = torch.arange(inputs.size(1), device=inputs.device).expand_as(inputs)  # [B, T]
    after_eos = torch.zeros_like(inputs, dtype=torch.bool)
    after_eos[:, 1:] = inputs[:, :-1] == eos_id
    starts = torch.where(after_eos, index, 0).cummax(1).values  # [B, T] first index of its doc
    return index - starts


def next_token_inputs(
    tokens: torch.Tensor, eos_id: int | None
) -> tuple[dict[str, torch.Tensor | bool], torch.Tensor]:
    """(model keyword arguments, targets [B, T]) of a causal LM on windows [B, T + 1].

    With `eos_id` (document masking) positions restart after each eos; with no attention mask,
    transformers turns those packed position_ids into a block-causal mask, so no token attends
    across a document boundary. The eos token's own target, the next document's first token, is
    IGNORE_INDEX: it cannot be predicted from a context that ends at the boundary, so the loss
    is the sum of the documents' own losses. use_cache=False because transformers ignores
    packed positions whenever a cache object exists, and the models default to making one.
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # [B, T], [B, T]
    if eos_id is None:
        return {"input_ids": inputs}, targets
    kwargs = {
        "input_ids": inputs,
        "position_ids": document_positions(inputs, eos_id),
        "use_cache": False,
    }
    return kwargs, targets.masked_fill(inputs == eos_id, IGNORE_INDEX)


class CausalLM:
    """Next-token prediction: inputs tokens[:, :-1], targets tokens[:, 1:].

    `eos_id` turns on document masking (see `next_token_inputs`); None packs windows plainly,
    attending across documents.
    """

    name = "causal_lm"

    def __init__(self, eos_id: int | None = None) -> None:
        self.eos_id = eos_id

    def loss(
        self, model: torch.nn.Module, tokens: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean next-token cross-entropy; no randomness, no extra metrics."""
        kwargs, targets = next_token_inputs(tokens, self.eos_id)
        logits = model(**kwargs).logits  # [B, T, V]
        return _cross_entropy(logits, targets), {}


def expert_fractions(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Share of top-k routing assignments each expert gets, averaged over layers: [E], sums to 1."""
    import torch

    num_experts = router_logits[0].size(-1)
    shares = []
    for logits in router_logits:  # [B*T, E] per layer
        chosen = logits.detach().topk(top_k, dim=-1).indices  # [B*T, k]
        counts = torch.bincount(chosen.flatten(), minlength=num_experts)  # [E]
        shares.append(counts.float() / chosen.numel())
    return torch.stack(shares).mean(0)  # [E]


class MoECausalLM:
    """Next-token prediction plus the router's load-balancing loss (Switch Transformer, eq. 4)."""

    name = "moe_causal_lm"

    def __init__(
        self, experts_per_token: int, aux_loss_coef: float, eos_id: int | None = None
    ) -> None:
        self.experts_per_token = experts_per_token
        self.aux_loss_coef = aux_loss_coef
        self.eos_id = eos_id  # document masking, as in CausalLM

    def loss(
        self, model: torch.nn.Module, tokens: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """CE + coef * aux loss; logs the CE alone as `lm_loss` and per-expert routing shares."""
        kwargs, targets = next_token_inputs(tokens, self.eos_id)
        out = model(**kwargs, output_router_logits=True)
        lm_loss = _cross_entropy(out.logits, targets)
        fractions = expert_fractions(out.router_logits, self.experts_per_token)  # [E]
        metrics = {
            "lm_loss": lm_loss.detach(),
            "moe/aux_loss": out.aux_loss.detach(),
            "moe/max_expert_fraction": fractions.max(),
        }
        metrics |= {f"moe/expert_{i}_fraction": share for i, share in enumerate(fractions)}
        return lm_loss + self.aux_loss_coef * out.aux_loss.to(lm_loss.dtype), metrics


def mask_tokens(
    tokens: torch.Tensor,
    generator: torch.Generator,
    *,
    mask_id: int,
    vocab_size: int,
    mlm_probability: float,
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT corruption of tokens [B, T]: (inputs, labels), labels IGNORE_INDEX off chosen positions.

    Each row has round(mlm_probability * non-pad tokens) chosen positions (at least one, never
    pad); of those 80% become `mask_id`, 10% a random id below `vocab_size`, 10% stay unchanged.
    """
    import torch

    shape, device = tokens.shape, tokens.device
    scores = torch.rand(shape, generator=generator).to(device)  # [B, T] choice order
    action = torch.rand(shape, generator=generator).to(device)  # [B, T] mask/random/keep
    random_ids = torch.randint(vocab_size, shape, generator=generator).to(device)  # [B, T]
    real = tokens != pad_id  # [B, T]
    num_chosen = (real.sum(1) * mlm_probability).round().clamp(min=1)  # [B]
    ranks = scores.masked_fill(~real, 2.0).argsort(1).argsort(1)  # [B, T] rank of each score
    chosen = real & (ranks < num_chosen[:, None])  # [B, T]
    labels = tokens.masked_fill(~chosen, IGNORE_INDEX)  # [B, T]
    inputs = torch.where(chosen & (action < 0.8), mask_id, tokens)  # [B, T]
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    return inputs, labels


class MaskedLM:
    """BERT's masked language modelling on the window's first seq_len tokens."""

    name = "masked_lm"

    def __init__(self, mask_id: int, vocab_size: int, mlm_probability: float, pad_id: int) -> None:
        self.mask_id = mask_id
        self.vocab_size = vocab_size  # the tokenizer's: random replacements are real tokens
        self.mlm_probability = mlm_probability
        self.pad_id = pad_id

    def loss(
        self, model: torch.nn.Module, tokens: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean CE over the chosen positions only; logs `mlm_accuracy` there."""
        sequence = tokens[:, :-1]  # [B, T]
        inputs, labels = mask_tokens(
            sequence,
            generator,
            mask_id=self.mask_id,
            vocab_size=self.vocab_size,
            mlm_probability=self.mlm_probability,
            pad_id=self.pad_id,
        )
        attention_mask = (sequence != self.pad_id).long()  # [B, T]
        logits = model(input_ids=inputs, attention_mask=attention_mask).logits  # [B, T, V]
        return _cross_entropy(logits, labels), {"mlm_accuracy": _accuracy(logits, labels)}


def span_counts(seq_len: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(corrupted tokens, corrupted spans) in a sequence of `seq_len` tokens, as T5 counts them."""
    num_noise = min(max(round(seq_len * noise_density), 1), seq_len - 1)
    num_spans = min(max(round(num_noise / mean_span_length), 1), seq_len - num_noise)
    return num_noise, num_spans


def _segment_lengths(
    num_items: int, num_segments: int, batch: int, generator: torch.Generator
) -> torch.Tensor:
    """Per row, a uniformly random split of `num_items` into `num_segments` non-empty runs: [B, S]."""
    import torch

    cut_order = torch.rand(batch, num_items - 1, generator=generator).argsort(1)  # [B, n-1]
    cuts = (cut_order[:, : num_segments - 1] + 1).sort(1).values  # [B, S-1] distinct, in 1..n-1
    first = torch.zeros(batch, 1, dtype=torch.long)
    last = torch.full((batch, 1), num_items)
    return torch.cat([first, cuts, last], 1).diff(dim=1)  # [B, S]


def noise_spans(
    batch: int,
    seq_len: int,
    noise_density: float,
    mean_span_length: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Span index of every corrupted token and -1 for kept ones: [B, T] (CPU).

    As in T5, kept runs and corrupted spans alternate, starting with a kept run, so no two spans
    touch and every row has the same number of corrupted tokens and spans.
    """
    import torch

    num_noise, num_spans = span_counts(seq_len, noise_density, mean_span_length)
    noise = _segment_lengths(num_noise, num_spans, batch, generator)  # [B, S]
    kept = _segment_lengths(seq_len - num_noise, num_spans, batch, generator)  # [B, S]
    run_ends = torch.stack([kept, noise], 2).flatten(1).cumsum(1)  # [B, 2S] kept0, span0, ...
    positions = torch.arange(seq_len).expand(batch, -1).contiguous()  # [B, T]
    run = torch.searchsorted(run_ends, positions, right=True)  # [B, T] run holding each token
    return torch.where(run % 2 == 1, run // 2, -1)


def corrupt_spans(
    tokens: torch.Tensor, span_ids: torch.Tensor, sentinel_start: int, eos_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder inputs, decoder targets) of tokens [B, T] with spans `span_ids` [B, T].

    Inputs keep the kept tokens and replace span i by sentinel `sentinel_start + i`; targets are
    each span's sentinel followed by its tokens; both end with eos.
    """
    import torch

    batch = tokens.size(0)
    noisy = span_ids >= 0  # [B, T]
    previous = torch.cat([torch.zeros_like(noisy[:, :1]), noisy[:, :-1]], 1)  # [B, T]
    starts = noisy & ~previous  # [B, T] first token of each span
    sentinels = sentinel_start + span_ids.clamp(min=0)  # [B, T]
    inputs = torch.where(starts, sentinels, tokens)[~noisy | starts].view(batch, -1)  # [B, T-N+S]
    pairs = torch.stack([sentinels, tokens], 2).flatten(1)  # [B, 2T] (sentinel, token) per token
    keep = torch.stack([starts, noisy], 2).flatten(1)  # [B, 2T]
    targets = pairs[keep].view(batch, -1)  # [B, N+S]
    eos = torch.full((batch, 1), eos_id, dtype=tokens.dtype, device=tokens.device)
    return torch.cat([inputs, eos], 1), torch.cat([targets, eos], 1)


class SpanCorruption:
    """T5's span corruption: the encoder sees sentinels, the decoder writes the spans they hide."""

    name = "span_corruption"

    def __init__(
        self,
        sentinel_start: int,
        num_sentinels: int,
        noise_density: float,
        mean_span_length: float,
        eos_id: int,
        pad_id: int,
    ) -> None:
        self.sentinel_start = sentinel_start
        self.num_sentinels = num_sentinels
        self.noise_density = noise_density
        self.mean_span_length = mean_span_length
        self.eos_id = eos_id
        self.pad_id = pad_id  # also the decoder's start token

    def loss(
        self, model: torch.nn.Module, tokens: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean CE over every target token (sentinels, span tokens, eos); logs span accuracy."""
        import torch

        sequence = tokens[:, :-1]  # [B, T]
        batch, seq_len = sequence.shape
        num_spans = span_counts(seq_len, self.noise_density, self.mean_span_length)[1]
        if num_spans > self.num_sentinels:
            raise PipelineError(
                f"{seq_len}-token windows have {num_spans} corrupted spans but the model has "
                f"{self.num_sentinels} sentinel tokens; use windows no longer than in pretraining"
            )
        span_ids = noise_spans(
            batch, seq_len, self.noise_density, self.mean_span_length, generator
        ).to(sequence.device)  # [B, T]
        inputs, targets = corrupt_spans(sequence, span_ids, self.sentinel_start, self.eos_id)
        start = torch.full_like(targets[:, :1], self.pad_id)  # [B, 1]
        decoder_inputs = torch.cat([start, targets[:, :-1]], 1)  # [B, L] targets shifted right
        logits = model(input_ids=inputs, decoder_input_ids=decoder_inputs).logits  # [B, L, V]
        loss = _cross_entropy(logits, targets)
        return loss, {"span_loss": loss.detach(), "span_accuracy": _accuracy(logits, targets)}
