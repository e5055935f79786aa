"""The healing objective: KL(teacher ‖ student) on the logits at a temperature, plus optional next-token CE and
optional layer-wise matching of the residual stream and of each attention block's output (attention_match.py)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossParts:
    loss: torch.Tensor  # what is back-propagated
    kl: torch.Tensor  # detached, per token
    ce: torch.Tensor  # detached, per predicted token
    hidden: torch.Tensor  # detached, mean over layers of the normalised hidden-state error
    attention: torch.Tensor  # detached, mean over layers of the normalised attention-output error


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    input_ids: torch.Tensor,
    kl_weight: float = 1.0,
    ce_weight: float = 0.0,
    temperature: float = 1.0,
    hidden: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None = None,
    hidden_weight: float = 0.0,
    attention: torch.Tensor | None = None,
    attention_weight: float = 0.0,
) -> LossParts:
    """kl_weight · T² · mean_tokens KL(softmax(t/T) ‖ softmax(s/T)) + ce_weight · CE(s, next token).

    The T² factor keeps gradient magnitudes comparable across temperatures (Hinton et al.). Every position
    of a packed block is distilled; CE predicts tokens 2..L of each block from the ones before. Both are
    computed in fp32 whatever the logits' dtype. CE is always reported, and only differentiated when weighted.
    `hidden` = (student, teacher) hidden states of every decoder layer: + hidden_weight · hidden_state_error.
    `attention` = AttentionMatch.error() of this batch: + attention_weight · attention.
    """
    vocab = student_logits.shape[-1]
    student = student_logits.float().reshape(-1, vocab)
    loss = student.new_zeros(())
    kl = student.new_zeros(())
    log_q = None
    if kl_weight > 0:
        if teacher_logits is None:
            raise ValueError("the KL term needs teacher logits")
        log_q = F.log_softmax(student / temperature if temperature != 1 else student, dim=-1)
        teacher = teacher_logits.float().reshape(-1, vocab)
        log_p = F.log_softmax(teacher / temperature if temperature != 1 else teacher, dim=-1)
        del teacher
        kl = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * temperature**2
        loss = loss + kl_weight * kl
    # Next-token CE from the T = 1 log-probabilities (reused from the KL term when T = 1: large vocabularies
    # make every extra (tokens × vocab) fp32 copy count).
    batch, length = input_ids.shape
    labels = input_ids[:, 1:].reshape(-1)
    with torch.set_grad_enabled(ce_weight > 0 and torch.is_grad_enabled()):
        log_probs = log_q if log_q is not None and temperature == 1 else F.log_softmax(student, dim=-1)
        if ce_weight == 0:
            log_probs = log_probs.detach()
        shifted = log_probs.view(batch, length, vocab)[:, :-1].reshape(-1, vocab)
        ce = F.nll_loss(shifted, labels)
    if ce_weight > 0:
        loss = loss + ce_weight * ce
    matched = student.new_zeros(())
    if hidden is not None:
        matched = hidden_state_error(*hidden)
        loss = loss + hidden_weight * matched
    if attention is not None:
        loss = loss + attention_weight * attention
    local = attention.detach() if attention is not None else student.new_zeros(())
    return LossParts(loss=loss, kl=kl.detach(), ce=ce.detach(), hidden=matched.detach(), attention=local)


def hidden_state_error(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean over layers of ‖s - t‖² / ‖t‖² (token-summed): every layer's output is pulled towards the teacher's,
    so each converted attention gets its own signal instead of only what reaches the logits. Normalising by the
    teacher's energy weighs layers equally, whatever the residual stream's growth with depth."""
    errors = [
        (s.float() - t.float()).pow(2).sum() / t.float().pow(2).sum().clamp_min(1e-12) for s, t in zip(student, teacher)
    ]
    return torch.stack(errors).mean()
