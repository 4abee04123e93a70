"""MLM: CLIP plus masked language modelling on the text tower (as x_clip's ``MLM``, BERT's recipe).

Per caption, ``ceil(mask_prob * n)`` of its n real tokens (not padding, start or end of text)
are chosen; ``replace_prob`` of those become the mask token, the rest stay as they are; a head
predicts the original token at every chosen position from the text tower's token features.
The loss is the mean cross-entropy over all chosen tokens of the global batch.

The MLM pass attends in both directions (``attention="bidirectional"``, the default), as BERT and
DeCLIP do: open_clip's text transformer is causal, and run as it is, a masked token would be
predicted from the tokens to its left only, while each of the 10% of chosen tokens left unchanged
would be predicted from itself (next-token prediction plus a copy task). So the masked captions go
through the same tower, same weights, with its causal mask lifted and padding masked as an
attention key instead (:meth:`vlhub.models.towers.OpenClipTextTower.attending_both_ways`); the
contrastive pass keeps the causal mask. ``attention="causal"`` runs the MLM pass as the contrastive
one, the behaviour before this option existed.

CLIP's vocabulary has no mask token, so the mask token is an embedding the objective owns,
written over the token embedding's output at the chosen positions (a forward hook, for that
call only): the text tower keeps open_clip's key layout and vocabulary, and a checkpoint still
loads with ``open_clip.create_model``. Which tokens are chosen and replaced is drawn from the
sample's id (:mod:`vlhub.objectives.draws`), so the gradient cache, ranks and one process draw
the same masks.

Where this departs from the papers: the mask token is a learned embedding rather than a vocabulary
entry (CLIP's vocabulary has none), and chosen tokens are never replaced by random tokens (x_clip's default
recipe: 90% mask token, 10% unchanged; BERT's is 80/10/10). x_clip's ``MLM`` draws its masks from
the global generator, so vlhub reuses its recipe and checks its loss against it (tests), not its module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from vlhub.data.batch import Batch
from vlhub.objectives.base import IncompatibleObjective, mean_token_nll, token_nll_per_sample
from vlhub.objectives.clip import ClipObjective
from vlhub.objectives.draws import sample_uniform
from vlhub.registry import OBJECTIVES

CHOOSE_STREAM, REPLACE_STREAM = 1, 2
ATTENTIONS = ("bidirectional", "causal")


def choose_tokens(maskable: torch.Tensor, sample_id: torch.Tensor, mask_prob: float) -> torch.Tensor:
    """[B, L] bool: ``ceil(mask_prob * n)`` of each row's n maskable positions, by the sample's draw."""
    draw = sample_uniform(sample_id, maskable.shape[1], CHOOSE_STREAM).to(maskable.device)
    draw = draw.masked_fill(~maskable, 2.0)  # never chosen
    rank = draw.argsort(dim=1).argsort(dim=1)
    quota = (maskable.sum(dim=1, keepdim=True).float() * mask_prob).ceil()
    return (rank < quota) & maskable


class MaskedLanguageModel(nn.Module):
    """The MLM term: its mask embedding, its vocabulary head, its masks and its per-sample loss."""

    def __init__(self, mask_prob: float = 0.15, replace_prob: float = 0.9, attention: str = "bidirectional") -> None:
        super().__init__()
        for name, value in (("mask_prob", mask_prob), ("replace_prob", replace_prob)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if attention not in ATTENTIONS:
            raise ValueError(f"mlm_attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
        self.mask_prob, self.replace_prob, self.attention = mask_prob, replace_prob, attention
        self.mask_embedding: nn.Parameter | None = None
        self.head: nn.Linear | None = None
        self.special_ids: tuple[int, ...] = ()

    def apply_to_model(self, model: nn.Module) -> None:
        tower = model.text_tower
        if tower is None or not tower.has_tokens or tower.token_embedding is None:
            raise IncompatibleObjective("masked language modelling needs open_clip's text transformer (token features)")
        if self.attention == "bidirectional" and not getattr(tower, "can_attend_both_ways", False):
            raise IncompatibleObjective(
                f"bidirectional MLM needs a text tower whose causal mask lifts, not {tower.describe()}"
            )
        if self.head is None:
            width = tower.token_embedding.embedding_dim
            self.mask_embedding = nn.Parameter(torch.randn(width) * 0.02)
            self.head = nn.Linear(tower.token_dim, tower.vocab_size)
        tokenizer = model.tokenizer
        ids = {getattr(tokenizer, "sot_token_id", None), getattr(tokenizer, "eot_token_id", None)}
        ids |= set(getattr(getattr(tokenizer, "tokenizer", None), "all_special_ids", []) or [])
        self.special_ids = tuple(sorted(i for i in ids if i is not None))

    def masks(self, text: torch.Tensor, sample_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen [B, L], replaced by the mask token [B, L]) for these captions."""
        maskable = text != 0  # open_clip pads with 0
        for special in self.special_ids:
            maskable &= text != special
        chosen = choose_tokens(maskable, sample_id, self.mask_prob)
        replace = sample_uniform(sample_id, text.shape[1], REPLACE_STREAM).to(text.device) < self.replace_prob
        return chosen, chosen & replace

    @contextlib.contextmanager
    def _masked_embeddings(self, model: nn.Module, replaced: torch.Tensor) -> Iterator[None]:
        def overwrite(module, inputs, output):
            return torch.where(replaced[..., None], self.mask_embedding.to(output.dtype), output)

        handle = model.text_tower.token_embedding.register_forward_hook(overwrite)
        try:
            yield
        finally:
            handle.remove()

    def token_features(self, model: nn.Module, text: torch.Tensor, replaced: torch.Tensor) -> torch.Tensor:
        """[B, L, D] text tower token features of the masked captions, attending as ``attention`` says."""
        both_ways = self.attention == "bidirectional"
        attending = model.text_tower.attending_both_ways() if both_ways else contextlib.nullcontext()
        with self._masked_embeddings(model, replaced), attending:
            return model(text=text, output_tokens=True)["text_tokens"]

    def represent(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """Per sample: the summed cross-entropy over its chosen tokens and how many there are.

        The vocabulary head runs on the chosen tokens only (about 15%): the [B, L, V] logits of
        every position would cost about seven times as much for the same loss.
        """
        text = batch["text"]
        chosen, replaced = self.masks(text, batch["sample_id"])
        features = self.token_features(model, text, replaced)
        nll = F.cross_entropy(self.head(features[chosen]), text[chosen], reduction="none")
        per_sample, tokens = token_nll_per_sample(nll, chosen)
        return {"mlm_nll": per_sample, "mlm_tokens": tokens}

    @staticmethod
    def loss(nll: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over every chosen token of the (gathered) batch."""
        return mean_token_nll(nll, tokens)


@OBJECTIVES.register("mlm")
class MlmObjective(ClipObjective):
    """``clip`` + ``mlm_weight`` x the MLM term; ``mlm_attention``: how the MLM pass attends (see the module)."""

    def __init__(
        self,
        mlm_weight: float = 0.05,
        mask_prob: float = 0.15,
        replace_prob: float = 0.9,
        mlm_attention: str = "bidirectional",
        **clip,
    ) -> None:
        super().__init__(**clip)
        self.mlm_weight = mlm_weight
        self.mlm = MaskedLanguageModel(mask_prob, replace_prob, mlm_attention)

    def apply_to_model(self, model: nn.Module) -> None:
        super().apply_to_model(model)
        self.mlm.apply_to_model(model)

    def represent(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        return {**super().represent(model, batch), **self.mlm.represent(model, batch)}

    def loss(self, reps: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        parts = super().loss(reps, model)
        mlm = self.mlm.loss(*self.gather_all(reps["mlm_nll"], reps["mlm_tokens"]))
        contrastive = parts["loss"]
        return {
            **parts,
            "loss": contrastive + self.mlm_weight * mlm,
            "contrastive_loss": contrastive.detach(),
            "mlm_loss": mlm.detach(),
        }
