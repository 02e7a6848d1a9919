"""The GRPO and DPO math on small tensors: group-normalised advantages (three scalings), completion masks, the clipped loss, DPO's sigmoid loss."""

import math

import pytest
import torch

from medfm.train.dpo import dpo_sigmoid_loss
from medfm.train.grpo import clipped_grpo_loss, completion_mask, group_advantages


def test_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    advantages = group_advantages(rewards, 3)
    assert advantages[:3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-3)  # (r - mean) / std within the group
    assert advantages[3:].tolist() == [0.0, 0.0, 0.0]  # a group whose rewards are all equal gives no signal


def test_batch_scaling_keeps_a_small_spread_small_and_none_does_not_scale():
    rewards = torch.tensor([0.0, 1.0, 2.0, 5.0, 5.1, 5.2])  # the second group's reports differ ten times less
    by_group = group_advantages(rewards, 3, "group")
    assert by_group[3:].tolist() == pytest.approx(by_group[:3].tolist(), abs=1e-3)  # per-group std: both groups weigh the same
    by_batch = group_advantages(rewards, 3, "batch")
    std = rewards.std().item()
    assert by_batch.tolist() == pytest.approx([-1 / std, 0.0, 1 / std, -0.1 / std, 0.0, 0.1 / std], abs=1e-3)
    gathered = torch.tensor([0.0, 10.0])  # e.g. every process's rewards: the std is theirs
    assert group_advantages(rewards, 3, "batch", gathered)[0].item() == pytest.approx(-1 / gathered.std().item(), abs=1e-3)
    assert group_advantages(rewards, 3, "none").tolist() == pytest.approx([-1.0, 0.0, 1.0, -0.1, 0.0, 0.1], abs=1e-5)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(rewards, 3, "max")


def test_completion_mask_ends_at_the_first_end_token():
    eos = 9
    ids = torch.tensor([[4, 5, 9, 9, 9], [4, 9, 5, 9, 0], [4, 5, 6, 7, 8]])
    assert completion_mask(ids, eos).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_on_policy_grpo_loss_is_the_advantage_weighted_log_likelihood_and_kl_starts_at_zero():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    advantages = torch.tensor([1.0, -1.0])
    loss, kl = clipped_grpo_loss(logps, logps.detach(), logps.detach(), advantages, mask, epsilon=0.2, beta=0.1)
    loss.backward()
    assert kl.item() == 0.0 and loss.item() == pytest.approx(0.0)  # ratio 1: -mean(A) = 0 here; no KL to itself
    expected = torch.tensor([[-0.5, -0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]]) / 2  # -A / tokens / sequences: the policy gradient
    torch.testing.assert_close(logps.grad, expected)


def test_the_clip_stops_the_gradient_beyond_one_plus_epsilon():
    logps = torch.tensor([[0.5]], requires_grad=True)  # ratio e^0.5 > 1.2 for a positive advantage: clipped
    loss, _ = clipped_grpo_loss(logps, torch.zeros(1, 1), None, torch.tensor([1.0]), torch.ones(1, 1), epsilon=0.2, beta=0.0)
    loss.backward()
    assert loss.item() == pytest.approx(-1.2) and logps.grad.item() == 0.0


def test_dpo_loss_is_log_two_at_the_reference_and_falls_as_the_chosen_margin_grows():
    same = torch.tensor([-10.0, -12.0])
    loss, logs = dpo_sigmoid_loss(same, same, same, same, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2)) and logs["rewards/margin"] == 0.0
    better, _ = dpo_sigmoid_loss(same + 1, same - 1, same, same, beta=0.1)
    assert better.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.2))), rel=1e-5) and better < loss
