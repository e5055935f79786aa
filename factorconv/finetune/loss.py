"""The healing objective: KL(teacher ‖ student) on the logits at a temperature, plus optional next-token CE."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossParts:
    loss: torch.Tensor  # what is back-propagated
    kl: torch.Tensor  # detached, per token
    ce: torch.Tensor  # detached, per predicted token


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    input_ids: torch.Tensor,
    kl_weight: float = 1.0,
    ce_weight: float = 0.0,
    temperature: float = 1.0,
) -> LossParts:
    """kl_weight · T² · mean_tokens KL(softmax(t/T) ‖ softmax(s/T)) + ce_weight · CE(s, next token).

    The T² factor keeps gradient magnitudes comparable across temperatures (Hinton et al.). Every position
    of a packed block is distilled; CE predicts tokens 2..L of each block from the ones before. Both are
    computed in fp32 whatever the logits' dtype. CE is always reported, and only differentiated when weighted.
    """
    vocab = student_logits.shape[-1]
    student = student_logits.float().reshape(-1, vocab)
    loss = student.new_zeros(())
    kl = student.new_zeros(())
    if kl_weight > 0:
        if teacher_logits is None:
            raise ValueError("the KL term needs teacher logits")
        log_q = F.log_softmax(student / temperature, dim=-1)
        log_p = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
        kl = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * temperature**2
        loss = loss + kl_weight * kl
    shifted = student_logits[:, :-1].float().reshape(-1, vocab)
    labels = input_ids[:, 1:].reshape(-1)
    if ce_weight > 0:
        ce = F.cross_entropy(shifted, labels)
        loss = loss + ce_weight * ce
    else:
        with torch.no_grad():
            ce = F.cross_entropy(shifted, labels)
    return LossParts(loss=loss, kl=kl.detach(), ce=ce.detach())
