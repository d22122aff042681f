"""VAPO's math against slow reference loops written here, and on hand-computed examples."""

import math
import statistics

import pytest
import torch

from common.distributed import explained_variance
from common.sampling import micro_batches
from vapo import (Denominators, actor_loss, advantages_and_returns, aggregate, clipped_policy_loss, critic_lambda,
                  gae, leave_one_out_baseline, length_adaptive_lambda, loss_denominators, minibatch_rows, policy_lambda,
                  positive_nll_loss, token_rewards, value_loss, whiten)


def reference_gae(rewards, values, mask, gamma, lams):
    """Textbook GAE, one sequence at a time over its real tokens only."""
    out = torch.zeros_like(values, dtype=torch.float64)
    for i in range(rewards.shape[0]):
        positions = [t for t in range(rewards.shape[1]) if mask[i, t] > 0]
        lam = float(lams[i])
        for k, t in enumerate(positions):
            total = 0.0
            for j, u in enumerate(positions[k:]):
                next_value = float(values[i, positions[k + j + 1]]) if k + j + 1 < len(positions) else 0.0
                delta = float(rewards[i, u]) + gamma * next_value - float(values[i, u])
                total += (gamma * lam) ** j * delta
            out[i, t] = total
    return out


def random_batch(seed, B=5, T=9):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    rewards = torch.randn(B, T, generator=g) * mask
    values = torch.randn(B, T, generator=g)
    return rewards, values, mask, lengths


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.0), (1.0, 1.0), (0.99, 0.5)])
def test_gae_matches_slow_loop_with_scalar_lambda(seed, gamma, lam):
    rewards, values, mask, _ = random_batch(seed)
    expected = reference_gae(rewards, values, mask, gamma, [lam] * len(rewards))
    assert torch.allclose(gae(rewards, values, mask, gamma, lam).double(), expected, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_gae_matches_slow_loop_with_per_sequence_lambda(seed):
    rewards, values, mask, lengths = random_batch(seed)
    lams = torch.rand(len(rewards), generator=torch.Generator().manual_seed(seed + 100))
    expected = reference_gae(rewards, values, mask, 1.0, lams)
    assert torch.allclose(gae(rewards, values, mask, 1.0, lams).double(), expected, atol=1e-5)


def test_gae_with_holes_in_the_mask_skips_them():
    """A mask with a gap (e.g. a tool response inside a turn) is skipped, not treated as an episode end."""
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.1, 9.0, 0.3, 0.4]])
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    expected = reference_gae(rewards, values, mask, 1.0, [0.5])
    assert torch.allclose(gae(rewards, values, mask, 1.0, 0.5).double(), expected, atol=1e-6)


def test_gae_lambda_one_gamma_one_is_monte_carlo_return_minus_value():
    rewards, values, mask, lengths = random_batch(7)
    returns_to_go = torch.flip(torch.cumsum(torch.flip(rewards, [1]), 1), [1])
    assert torch.allclose(gae(rewards, values, mask, 1.0, 1.0), (returns_to_go - values) * mask, atol=1e-5)


def test_gae_lambda_zero_is_one_step_td_error():
    rewards, values, mask, lengths = random_batch(3)
    next_values = torch.cat([values[:, 1:], torch.zeros(len(values), 1)], 1) * torch.cat([mask[:, 1:], torch.zeros(len(values), 1)], 1)
    assert torch.allclose(gae(rewards, values, mask, 1.0, 0.0), (rewards + next_values - values) * mask, atol=1e-6)


def test_values_at_masked_positions_change_nothing():
    rewards, values, mask, _ = random_batch(11)
    noisy = values + (1 - mask) * torch.randn_like(values) * 100
    assert torch.equal(gae(rewards, values, mask, 1.0, 0.9), gae(rewards, noisy, mask, 1.0, 0.9))


def test_gae_hand_example():
    # one sequence, three tokens, reward 1 at the end, V = (0.5, 0.6, 0.7), γ = 1, λ = 0.5
    # δ = (0 + 0.6 - 0.5, 0 + 0.7 - 0.6, 1 - 0.7) = (0.1, 0.1, 0.3)
    # A_2 = 0.3, A_1 = 0.1 + 0.5·0.3 = 0.25, A_0 = 0.1 + 0.5·0.25 = 0.225
    out = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]), torch.ones(1, 3), 1.0, 0.5)
    assert torch.allclose(out, torch.tensor([[0.225, 0.25, 0.3]]))


def test_critic_target_with_lambda_one_is_the_final_reward_everywhere():
    """γ = λ = 1 and a reward only at the end: every token's target is the outcome (VAPO §4.1)."""
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, -1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    values = torch.randn(2, 4)
    returns = (gae(rewards, values, mask, 1.0, 1.0) + values) * mask
    assert torch.allclose(returns, torch.tensor([[1.0, 1.0, 1.0, 0.0], [-1.0, -1.0, 0.0, 0.0]]), atol=1e-6)


def test_length_adaptive_lambda_hand_values_and_clamping():
    lam = length_adaptive_lambda(torch.tensor([10, 20, 40, 100, 1000, 20000]), alpha=0.05)
    # 1 - 1/(0.05 l): l=10 -> -1 -> 0; l=20 -> 0; l=40 -> 0.5; l=100 -> 0.8; l=1000 -> 0.98; l=20000 -> 0.999
    assert torch.allclose(lam, torch.tensor([0.0, 0.0, 0.5, 0.8, 0.98, 0.999]), atol=1e-6)
    assert length_adaptive_lambda(torch.tensor([5]), alpha=10.0).item() == pytest.approx(0.98)
    # the effective horizon 1/(1-λ) is α·l
    assert 1 / (1 - length_adaptive_lambda(torch.tensor([400]), 0.05).item()) == pytest.approx(20, rel=1e-4)


def test_token_mean_and_sample_mean_hand_values():
    per_token = torch.tensor([[1.0, 1.0, 0.0, 0.0], [3.0, 3.0, 3.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    # token-level: (1+1+3·4)/6 = 14/6; sample-level: (1 + 3)/2 = 2
    assert aggregate(per_token, mask, True, 6, 2).item() == pytest.approx(14 / 6)
    assert aggregate(per_token, mask, False, 6, 2).item() == pytest.approx(2.0)


def test_token_mean_weights_long_samples_more_than_sample_mean():
    """The short sample's tokens weigh 1/2 each under the sample mean, 1/6 under the token mean."""
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, 0.0], [1.0] * 6])
    token_grad = torch.autograd.functional.jacobian(lambda x: aggregate(x, mask, True, 8, 2), torch.zeros(2, 6))
    sample_grad = torch.autograd.functional.jacobian(lambda x: aggregate(x, mask, False, 8, 2), torch.zeros(2, 6))
    assert token_grad[0, 0] == pytest.approx(1 / 8) and token_grad[1, 0] == pytest.approx(1 / 8)
    assert sample_grad[0, 0] == pytest.approx(1 / 4) and sample_grad[1, 0] == pytest.approx(1 / 12)


@pytest.mark.parametrize("token_level", [True, False])
def test_micro_batches_give_the_gradient_of_one_batch(token_level):
    torch.manual_seed(0)
    weights = torch.randn(6, 5, requires_grad=True)
    mask = (torch.arange(5)[None] < torch.tensor([1, 5, 2, 4, 3, 5])[:, None]).float()
    n_tokens, n_samples = mask.sum().item(), 6
    aggregate(weights ** 2, mask, token_level, n_tokens, n_samples).backward()
    whole = weights.grad.clone()
    weights.grad = None
    for rows in ([0, 1], [2, 3, 4], [5]):
        aggregate(weights[rows] ** 2, mask[rows], token_level, n_tokens, n_samples).backward()
    assert torch.allclose(weights.grad, whole, atol=1e-7)


def test_clip_higher_is_asymmetric_by_advantage_sign():
    ratios = torch.tensor([[0.5, 0.9, 1.0, 1.25, 1.5]])
    logp, old = ratios.log(), torch.zeros_like(ratios)
    positive, high, low = clipped_policy_loss(logp, old, torch.ones_like(ratios), 0.2, 0.28)
    # A > 0: the gain is capped at ratio 1.28; small ratios are not clipped (min picks r·A)
    assert torch.allclose(positive, -torch.tensor([[0.5, 0.9, 1.0, 1.25, 1.28]]))
    assert high.tolist() == [[False, False, False, False, True]] and not low.any()
    negative, high, low = clipped_policy_loss(logp, old, -torch.ones_like(ratios), 0.2, 0.28)
    # A < 0: the ratio is floored at 0.8; large ratios are not clipped
    assert torch.allclose(negative, torch.tensor([[0.8, 0.9, 1.0, 1.25, 1.5]]))
    assert low.tolist() == [[True, False, False, False, False]] and not high.any()


def test_clip_is_inactive_at_ratio_one_and_gradient_is_minus_advantage():
    advantages = torch.tensor([[0.3, -2.0, 1.5]])
    logp = torch.zeros(1, 3, requires_grad=True)
    loss, high, low = clipped_policy_loss(logp, torch.zeros(1, 3), advantages, 0.2, 0.28)
    loss.sum().backward()
    assert torch.allclose(logp.grad, -advantages) and not high.any() and not low.any()


def test_clipped_tokens_have_no_gradient():
    logp = torch.tensor([[math.log(1.5), math.log(0.5)]], requires_grad=True)
    loss, *_ = clipped_policy_loss(logp, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), 0.2, 0.28)
    loss.sum().backward()
    assert torch.equal(logp.grad, torch.zeros(1, 2))


def test_nll_only_on_correct_samples_token_mean():
    logprobs = torch.tensor([[-1.0, -2.0, 0.0], [-4.0, -4.0, -4.0], [-3.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    correct = torch.tensor([True, False, True])
    # correct tokens: -1, -2, -3 -> loss = 6 / 3
    assert positive_nll_loss(logprobs, mask, correct, 3.0).item() == pytest.approx(2.0)
    none = positive_nll_loss(logprobs, mask, torch.zeros(3, dtype=torch.bool), 0.0)
    assert none.item() == 0.0


def test_value_loss_hand_example_with_clip():
    values, old, returns, mask = (torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]]),
                                  torch.tensor([[1.0, 1.0]]), torch.ones(1, 2))
    # token 0: unclipped (2-1)^2 = 1, clipped V = 0.5 -> (0.5-1)^2 = 0.25, max = 1; token 1: (0-1)^2 = 1
    assert value_loss(values, old, returns, mask, 0.5, 2.0).item() == pytest.approx(0.5 * (1 + 1) / 2)
    values = torch.tensor([[0.9, 0.0]])  # clipped to 0.5: max((0.1)^2, (0.5)^2) = 0.25
    assert value_loss(values, old, returns, mask, 0.5, 2.0).item() == pytest.approx(0.5 * (0.25 + 1) / 2)


def test_whiten_and_explained_variance():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = whiten(x, mask)
    assert w[0, :3].mean().item() == pytest.approx(0.0, abs=1e-6) and w[0, 3].item() == 0.0
    returns = torch.tensor([[1.0, -1.0, 1.0, 5.0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    # a constant prediction explains nothing, whatever the constant
    assert explained_variance(torch.zeros(1, 4), returns, mask) == pytest.approx(0.0, abs=1e-6)
    assert explained_variance(torch.full((1, 4), 0.7), returns, mask) == pytest.approx(0.0, abs=1e-6)


def test_leave_one_out_baseline_by_hand_and_against_a_loop():
    # prompt 0 has rewards 1, -1, -1; prompt 1 has 1, 1; prompt 2 a single sample
    rewards = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    prompts = torch.tensor([0, 0, 1, 0, 1, 2])
    baseline = leave_one_out_baseline(rewards, prompts)
    assert baseline[:5].tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0, 1.0])
    assert math.isnan(baseline[5])  # no other sample to compare with

    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(40, generator=generator)
    prompts = torch.randint(0, 6, (40,), generator=generator)
    expected = [statistics.mean(float(rewards[j]) for j in range(40) if prompts[j] == prompts[i] and j != i)
                for i in range(40)]
    assert leave_one_out_baseline(rewards, prompts).tolist() == pytest.approx(expected, abs=1e-6)


def _all_run_partitions(n):
    """Every way to cut 0..n-1 into consecutive runs."""
    if n == 0:
        yield []
        return
    for first in range(1, n + 1):
        for rest in _all_run_partitions(n - first):
            yield [list(range(first))] + [[first + i for i in run] for run in rest]


def test_micro_batches_hand_example():
    lengths = [10, 50, 12, 48, 11, 100]
    # 3 passes: [10, 11, 12] pads to 36, [48, 50] to 100, [100] alone (it fills the budget)
    assert micro_batches(lengths, list(range(6)), token_budget=120, pass_cost=20) == [[0, 4, 2], [3, 1], [5]]
    # with free passes every row goes alone (no padding); with costly ones, as few as the budget allows
    assert len(micro_batches(lengths, list(range(6)), token_budget=120, pass_cost=0)) == 6
    assert micro_batches(lengths, [0, 2, 4], token_budget=1000, pass_cost=1000) == [[0, 4, 2]]


def test_micro_batches_are_optimal_and_within_budget():
    generator = torch.Generator().manual_seed(0)
    for trial in range(30):
        n = 7
        lengths = torch.randint(1, 40, (n,), generator=generator).tolist()
        budget, pass_cost = int(torch.randint(40, 120, (1,), generator=generator)), trial % 4 * 10
        groups = micro_batches(lengths, list(range(n)), budget, pass_cost)
        assert sorted(r for g in groups for r in g) == list(range(n))
        assert all(len(g) * max(lengths[r] for r in g) <= budget or len(g) == 1 for g in groups)

        def cost(groups):
            return sum(len(g) * max(lengths[r] for r in g) + pass_cost for g in groups)

        ordered = sorted(range(n), key=lambda r: lengths[r])
        feasible = [[[ordered[i] for i in run] for run in p] for p in _all_run_partitions(n)]
        feasible = [p for p in feasible if all(len(g) * max(lengths[r] for r in g) <= budget for g in p)]
        assert cost(groups) == min(cost(p) for p in feasible)


# ---- the loop's steps as functions: one phase of a 3-token and a 5-token response, every number checked ----

def two_responses():
    """A: 3 tokens, correct, V = (0.5, 0.6, 0.7); B: 5 tokens, wrong, V = (0.1, ..., 0.5)."""
    mask = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    values = torch.tensor([[0.5, 0.6, 0.7, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4, 0.5]])
    correct = torch.tensor([True, False])
    return mask, values, correct


def test_token_rewards_put_the_verdict_on_each_responses_last_token():
    mask, _, correct = two_responses()
    rewards = token_rewards(mask, correct, reward_correct=1.0, reward_wrong=-1.0)
    assert rewards.tolist() == [[0, 0, 1, 0, 0], [0, 0, 0, 0, -1]]
    with pytest.raises(ValueError, match="no tokens"):
        token_rewards(torch.zeros(1, 3), torch.tensor([True]), 1.0, -1.0)


def test_policy_and_critic_lambdas_of_each_phase():
    lengths = torch.tensor([3, 5])
    # (3) length-adaptive, α = 0.5: 1 - 1/(0.5·3) = 1/3 and 1 - 1/(0.5·5) = 0.6; off: the fixed 0.95
    assert policy_lambda(lengths, True, 0.5, 0.95).tolist() == pytest.approx([1 / 3, 0.6])
    assert policy_lambda(lengths, False, 0.5, 0.95).tolist() == pytest.approx([0.95, 0.95])
    lam_policy = torch.tensor([1 / 3, 0.6])
    assert critic_lambda(True, True, 0.9, lam_policy) == 1.0  # (1) value pretraining: Monte Carlo, whatever λ_critic
    assert critic_lambda(True, False, 0.9, lam_policy) == 1.0
    assert critic_lambda(False, True, 0.9, lam_policy) == 0.9  # (2) decoupled
    assert critic_lambda(False, False, 0.9, lam_policy) is lam_policy  # vanilla: the policy's λ


def test_advantages_and_returns_of_one_rl_phase_by_hand():
    mask, values, correct = two_responses()
    rewards = token_rewards(mask, correct, 1.0, -1.0)
    lam_policy = torch.tensor([1 / 3, 0.6])
    # A: δ = (0.1, 0.1, 0.3); A_2 = 0.3, A_1 = 0.1 + 0.3/3 = 0.2, A_0 = 0.1 + 0.2/3
    # B: δ = (0.1, 0.1, 0.1, 0.1, -1.5); A_4 = -1.5, A_3 = 0.1 - 0.9 = -0.8, A_2 = 0.1 - 0.48 = -0.38,
    #    A_1 = 0.1 - 0.228 = -0.128, A_0 = 0.1 - 0.0768 = 0.0232
    expected_a = [[0.1 + 0.2 / 3, 0.2, 0.3, 0, 0], [0.0232, -0.128, -0.38, -0.8, -1.5]]
    advantages, returns = advantages_and_returns(rewards, values, mask, 1.0, lam_policy, 1.0, whiten_advantages=False)
    assert advantages.tolist() == [pytest.approx(row, abs=1e-6) for row in expected_a]
    # decoupled GAE, λ_critic = 1: every token's target is the outcome
    assert returns.tolist() == [pytest.approx([1, 1, 1, 0, 0], abs=1e-6), pytest.approx([-1] * 5, abs=1e-6)]
    # not decoupled: the critic regresses on A + V with the policy's λ
    _, coupled = advantages_and_returns(rewards, values, mask, 1.0, lam_policy, lam_policy, whiten_advantages=False)
    expected_r = [[expected_a[0][t] + values[0, t].item() if t < 3 else 0 for t in range(5)],
                  [expected_a[1][t] + values[1, t].item() for t in range(5)]]
    assert coupled.tolist() == [pytest.approx(row, abs=1e-6) for row in expected_r]
    # whitened over the 8 response tokens (mean and population std), 0 on padding
    flat = expected_a[0][:3] + expected_a[1]
    mean, std = statistics.fmean(flat), statistics.pstdev(flat)
    whitened, _ = advantages_and_returns(rewards, values, mask, 1.0, lam_policy, 1.0, whiten_advantages=True)
    assert whitened[0, :3].tolist() == pytest.approx([(a - mean) / std for a in expected_a[0][:3]], abs=1e-5)
    assert whitened[1].tolist() == pytest.approx([(a - mean) / std for a in expected_a[1]], abs=1e-5)
    assert whitened[0, 3:].tolist() == [0, 0]


def test_whiten_scales_as_well_as_centres():
    x, mask = torch.tensor([[2.0, 4.0, 6.0, 8.0]]), torch.ones(1, 4)
    w = whiten(x, mask)
    assert w.tolist() == [pytest.approx([(v - 5) / math.sqrt(5) for v in (2, 4, 6, 8)], abs=1e-5)]
    assert whiten(x, mask, across_ranks=True).tolist() == w.tolist()  # one process: the same


def test_loss_denominators_count_the_minibatch():
    mask, _, correct = two_responses()
    assert loss_denominators(mask, correct) == Denominators(tokens=8.0, samples=2.0, correct_tokens=3.0)


def test_actor_loss_by_hand():
    mask, _, correct = two_responses()
    advantages = torch.tensor([[0.5, -1.0, 2.0, 0, 0], [1.0, 1.0, -0.5, 0.0, 0.25]])
    old = torch.tensor([[-1.0, -2.0, -3.0, 0, 0], [-1.0, -1.0, -1.0, -1.0, -1.0]])
    new = old.clone()
    new[1, 0] = old[1, 0] + math.log(1.5)  # ratio 1.5 > 1.28 with A > 0: clipped high
    new[1, 2] = old[1, 2] + math.log(0.5)  # ratio 0.5 < 0.8 with A < 0: clipped low
    # per-token surrogate: -A·r, or -A·clip(r) where that is larger: A: (-0.5, 1, -2); B: (-1.28, -1, 0.4, 0, -0.25)
    per_token = [[-0.5, 1.0, -2.0], [-1.28, -1.0, 0.4, 0.0, -0.25]]
    nll = (1 + 2 + 3) / 3  # only A is correct: -Σ log π over its 3 tokens / 3
    loss, parts = actor_loss(new, old, advantages, mask, correct, [8.0, 2.0, 3.0], 0.2, 0.28, True, 0.1)
    token_mean = (sum(per_token[0]) + sum(per_token[1])) / 8
    assert parts["pg_loss"] == pytest.approx(token_mean) and parts["nll_loss"] == pytest.approx(nll)
    assert loss.item() == pytest.approx(token_mean + 0.1 * nll)
    assert (parts["clip_high"], parts["clip_low"]) == (1.0, 1.0)
    _, parts = actor_loss(new, old, advantages, mask, correct, [8.0, 2.0, 3.0], 0.2, 0.28, False, 0.1)
    assert parts["pg_loss"] == pytest.approx((sum(per_token[0]) / 3 + sum(per_token[1]) / 5) / 2)  # sample mean
    # the denominators are the mini-batch's: the same rows in a larger mini-batch weigh less
    _, parts = actor_loss(new, old, advantages, mask, correct, [16.0, 4.0, 6.0], 0.2, 0.28, True, 0.1)
    assert parts["pg_loss"] == pytest.approx(token_mean / 2) and parts["nll_loss"] == pytest.approx(nll / 2)


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_minibatches_do_not_depend_on_the_number_of_processes(processes):
    rollout, updates = 32, 4
    whole = minibatch_rows(0, rollout, updates, seed=7)
    share = rollout // processes
    parts = [minibatch_rows(r * share, share, updates, seed=7) for r in range(processes)]
    for k in range(updates):
        assert sorted(r * share + i for r in range(processes) for i in parts[r][k]) == sorted(whole[k])
        assert all(len(part[k]) == rollout // updates // processes for part in parts)  # an equal share each


def test_minibatches_take_one_sample_of_every_tile_in_a_shuffled_order():
    batches = minibatch_rows(0, 12, 3, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(12))
    for batch in batches:
        assert sorted(i // 3 for i in batch) == [0, 1, 2, 3]  # one sample of each run of 3
    assert minibatch_rows(0, 12, 3, seed=0) == batches and minibatch_rows(0, 12, 3, seed=1) != batches
    with pytest.raises(ValueError, match="equal shares"):
        minibatch_rows(0, 10, 3, seed=0)


def vapo_args(*flags):
    import vapo

    return vapo.parse_args(["--model", "unused", "--no-whiten-advantages", "--alpha", "0.5", *flags])


VANILLA_A = [[0.46575, 0.385, 0.3, 0, 0], [-0.850771875, -1.0008125, -1.15875, -1.325, -1.5]]  # λ = 0.95 by hand


@pytest.mark.parametrize("flags, value_pretraining, advantages, returns", [
    # VAPO in RL: λ_policy 1/3 and 0.6 (length-adaptive), λ_critic 1 (decoupled): Monte-Carlo targets
    ((), False, [[0.1 + 0.2 / 3, 0.2, 0.3, 0, 0], [0.0232, -0.128, -0.38, -0.8, -1.5]],
     [[1, 1, 1, 0, 0], [-1] * 5]),
    # value pretraining: Monte-Carlo targets even without decoupled GAE
    (("--no-decoupled-gae",), True, [[0.1 + 0.2 / 3, 0.2, 0.3, 0, 0], [0.0232, -0.128, -0.38, -0.8, -1.5]],
     [[1, 1, 1, 0, 0], [-1] * 5]),
    # vanilla PPO: λ 0.95 for both, the critic regresses on A + V
    (("--preset", "vanilla-ppo", "--no-whiten-advantages"), False, VANILLA_A,
     [[0.96575, 0.985, 1.0, 0, 0], [-0.750771875, -0.8008125, -0.85875, -0.925, -1.0]]),
    # decoupled but not length-adaptive: the advantages of λ 0.95, the targets of λ 1
    (("--no-length-adaptive-gae",), False, VANILLA_A, [[1, 1, 1, 0, 0], [-1] * 5]),
])
def test_phase_targets_of_a_3_and_a_5_token_response(flags, value_pretraining, advantages, returns):
    import vapo

    mask, values, correct = two_responses()
    rewards, lam_policy, got_advantages, got_returns = vapo.phase_targets(mask, correct, values, value_pretraining,
                                                                           vapo_args(*flags))
    assert rewards.tolist() == [[0, 0, 1, 0, 0], [0, 0, 0, 0, -1]]
    assert got_advantages.tolist() == [pytest.approx(row, abs=1e-5) for row in advantages]
    assert got_returns.tolist() == [pytest.approx(row, abs=1e-5) for row in returns]


def test_the_update_on_a_fixed_rollout_has_the_minibatch_losses_whatever_its_micro_batches(tiny_model_dir, tmp_path):
    """One mini-batch, cut into several micro-batches: at the update the policy is still the rollout policy
    (every ratio 1), so the summed losses are the mini-batch's own: the token mean of -A, the mean of
    -log π over the correct samples' tokens, and the token mean of ½(V - R)²."""
    from accelerate import Accelerator

    import vapo
    from common.sampling import Sample, collate

    args = vapo.parse_args(["--model", str(tiny_model_dir), "--dtype", "float32", "--no-gradient-checkpointing",
                            "--prompts-per-step", "2", "--samples-per-prompt", "2", "--mini-batch-size", "4",
                            "--micro-batch-tokens", "12"])
    accelerator = Accelerator(step_scheduler_with_optimizer=False)
    policy, critic, tokenizer, (actor_opt, critic_opt), _ = vapo.prepared_models(args, args.model, accelerator)
    batch = collate([Sample(0, [5, 6], [8, 9, 10], "", "stop"), Sample(0, [5, 6], [12, 13, 14, 15, 16], "", "stop"),
                     Sample(1, [4], [7], "", "stop"), Sample(1, [4], [9, 9, 9, 9], "", "stop")], tokenizer.pad_token_id)
    correct, mask = torch.tensor([True, False, True, False]), batch.response_mask
    old_logprobs, old_values = vapo.score_rollout(policy, critic, batch, args.micro_batch_tokens, args.temperature)
    _, _, advantages, returns = vapo.phase_targets(mask, correct, old_values, False, args)
    rollout = vapo.Rollout(batch, correct, old_logprobs, old_values, advantages, returns, first_sample=0)
    sums = vapo.ppo_update(policy, critic, actor_opt, critic_opt, accelerator, rollout, args, step=0,
                           train_actor=True, run_dir=tmp_path)
    n, positive = mask.sum(), mask * correct.unsqueeze(-1)
    assert sums["updates"] == 1
    assert len(micro_batches(batch.attention_mask.sum(-1).tolist(), [0, 1, 2, 3], 12)) >= 3  # it ran several
    assert sums["pg_loss"] == pytest.approx(float(-(advantages * mask).sum() / n), abs=1e-5)
    assert sums["nll_loss"] == pytest.approx(float(-(old_logprobs * positive).sum() / positive.sum()), abs=1e-5)
    assert sums["value_loss"] == pytest.approx(float(0.5 * ((old_values - returns) ** 2 * mask).sum() / n), abs=1e-5)
    assert sums["clip_high"] == sums["clip_low"] == 0


def test_tokens_are_binned_by_position_and_by_their_responses_length():
    import vapo

    mask = torch.zeros(2, 40)
    mask[0, :3], mask[1, :35] = 1, 1  # a 3-token and a 35-token response
    positions, lengths = vapo.position_and_length_bins(mask, edges=(0, 2, 32))
    assert vapo.bin_names((0, 2, 32)) == ["0-1", "2-31", "32+"]
    assert positions[0, :3].tolist() == [0, 0, 1] and positions[1, [1, 2, 31, 32, 34]].tolist() == [0, 1, 1, 2, 2]
    assert lengths[0, :3].tolist() == [1, 1, 1] and set(lengths[1, :35].tolist()) == {2}


def test_binned_explained_variance_by_hand_and_against_a_loop():
    """Each bin's value is 1 - Var(R - V) / Var(R) over that bin's response tokens alone."""
    import vapo

    values = torch.tensor([[0.5, 0.5, 9.0], [0.0, 1.0, 9.0]])
    outcome = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    bins = torch.tensor([[0, 1, 1], [0, 1, 1]])
    # bin 0: R (1, 0), V (0.5, 0): R - V (0.5, 0), Var 0.0625 against 0.25; bin 1: R (1, 1) has no variance
    ev = vapo.binned_explained_variance(values, outcome, mask, bins, 3)
    assert ev[0] == pytest.approx(0.75) and math.isnan(ev[1]) and math.isnan(ev[2])

    generator = torch.Generator().manual_seed(0)
    values, outcome = torch.rand(6, 50, generator=generator), torch.tensor([[0.0], [1], [1], [0], [1], [0]]).expand(6, 50)
    mask = (torch.arange(50) < torch.tensor([[5], [12], [30], [44], [50], [20]])).float()
    positions, lengths = vapo.position_and_length_bins(mask, edges=(0, 8, 24))
    for bins in (positions, lengths):
        found = vapo.binned_explained_variance(values, outcome, mask, bins, 3)
        for k in range(3):
            tokens = [(float(values[i, t]), float(outcome[i, t])) for i in range(6) for t in range(50)
                      if mask[i, t] and bins[i, t] == k]
            r = [target for _, target in tokens]
            if statistics.pvariance(r) == 0:  # the length bin of one response: one outcome
                assert math.isnan(found[k])
                continue
            expected = 1 - statistics.pvariance([target - v for v, target in tokens]) / statistics.pvariance(r)
            assert found[k] == pytest.approx(expected, rel=1e-9)
