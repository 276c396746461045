"""grpo.py against hand-checked values: rewards of written-out completions, advantages and every loss
type on toy batches worked out on paper (value and gradient), rollouts against naive generation on a
tiny random model. Nothing is downloaded."""

import contextlib
import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F

import bench
import grpo as G
import model as M
from conftest import tiny_model, tiny_prompt
from grpo import (Rollout, accuracy_reward, combined_reward, completion_logprobs, completion_mask, format_reward,
                  group_advantages, grpo_loss, rollout, sample_token, score, shuffle_frames,
                  step_metrics, temporal_bonus, zero_variance_groups)

# ----------------------------------------------------------------------------- rewards

DOG = "I see a dog."  # 12 characters of thinking: format 0.5 + 12/2400 = 0.505
LINES = "First, the man walks.\nThen he sits."  # 21 + 1 + 13 = 35 characters

# (completion, solution, accuracy, format), each worked out by hand from the paper's reward rules.
CASES = [
    (f"<think>{DOG}</think><answer>B</answer>", "B", 1, 0.505),
    (f"<think>{DOG}</think> <answer>B</answer>", "<answer>B</answer>", 1, 0.505),
    (f"<think>{DOG}</think>\n\n<answer>B</answer>", "B", 1, 0.505),
    (f"  <think>{DOG}</think><answer>B</answer>\n", "B", 1, 0.505),  # surrounding whitespace is stripped
    (f"<think>\n{LINES}\n</think>\n<answer>B</answer>", "B", 1, 0.5 + 35 / 2400),  # multi-line thinking
    (f"<think>  {DOG}  </think><answer>B</answer>", "B", 1, 0.505),  # thinking length counts stripped
    ("<think>" + "x" * 1200 + "</think><answer>A</answer>", "A", 1, 1.0),
    ("<think>" + "x" * 5000 + "</think><answer>A</answer>", "A", 1, 1.0),  # capped at 1200 characters
    ("<think>" + "x" * 600 + "</think><answer>C</answer>", "A", 0, 0.75),
    ("<think></think><answer>B</answer>", "B", 1, 0.5),  # empty thinking still has the format
    (f"<think>{DOG}</think><answer>B. sit down</answer>", "B", 1, 0.505),  # the solution is the first character
    ("<answer>B. sit down</answer>", "B. sit down", 1, 0.0),  # no thinking: no format
    (f"<think>{DOG}</think><answer>B</answer>", "B. sit down", 0, 0.505),  # the rule is one-way
    (f"<think>{DOG}</think><answer>b</answer>", "B", 0, 0.505),  # case-sensitive
    (f"<think>{DOG}</think><answer> B </answer>", "B", 1, 0.505),  # the answer is stripped
    (f"<think>{DOG}</think><answer>\nB\n</answer>", "B", 1, 0.505),  # an answer over lines (DOTALL)
    (f"<think>{DOG}</think><answer>A</answer>", "<answer> B </answer>", 0, 0.505),
    (f"<think>{DOG}</think><answer></answer>", "B", 0, 0.505),  # empty answer: wrong, format kept
    ("<think>Wait, let me re-check.</think><answer>10</answer>", "1", 1, 0.5 + 22 / 2400),  # "1" is 10's first character
    ("B", "B", 1, 0.0),  # no tags: the whole completion is the answer
    ("B. sit down", "B", 1, 0.0),
    ("The answer is B", "B", 0, 0.0),
    ("", "B", 0, 0.0),  # empty completion
    ("   \n ", "B", 0, 0.0),
    (f"<think>{DOG}</think><answer>B</answer><answer>C</answer>", "B", 1, 0.0),  # doubled answer: first one counts, no format
    ("<think>a</think><think>b</think><answer>B</answer>", "B", 1, 0.0),  # doubled think
    ("<think>maybe <answer>A</answer>?</think><answer>B</answer>", "B", 0, 0.0),  # the first <answer> is inside the thinking
    (f"<think>{DOG}<answer>B</answer>", "B", 1, 0.0),  # missing </think>
    (f"<think>{DOG}</think><answer>B", "B", 0, 0.0),  # missing </answer>: the whole text is no answer
    (f"<think>{DOG}</think>B", "B", 0, 0.0),  # no answer tags, and "<" is not "B"
    (f"<think>{DOG}</think><answer>B</answer> Hope this helps.", "B", 1, 0.0),  # text after the answer
    (f"Sure! <think>{DOG}</think><answer>B</answer>", "B", 1, 0.0),  # text before the thinking
    (f"<THINK>{DOG}</THINK><answer>B</answer>", "B", 1, 0.0),  # tags are case-sensitive
    (f"<answer>B</answer><think>{DOG}</think>", "B", 1, 0.0),  # wrong order
]


@pytest.mark.parametrize("completion, solution, acc, fmt", CASES)
def test_accuracy_and_format_rewards_of_hand_checked_completions(completion, solution, acc, fmt):
    assert accuracy_reward(completion, solution) == acc
    assert format_reward(completion) == pytest.approx(fmt, abs=1e-12)
    # score keeps rewards as float32 tensors
    got = combined_reward(accuracy_reward(completion, solution), format_reward(completion))
    assert got == pytest.approx(combined_reward(acc, fmt), abs=1e-12)  # in Python floats, as the paper's code
    assert score([completion], [solution])["reward"].item() == pytest.approx(got, abs=1e-6)  # score's tensors are fp32


def test_combined_reward_is_the_papers_table():
    assert combined_reward(1, 0.5) == 1.5 and combined_reward(1, 1) == 2 and combined_reward(1, 0) == 1
    assert combined_reward(0, 0.5) == -0.5 and combined_reward(0, 1) == -1
    assert combined_reward(0, 0) == -2  # wrong and without format: 0 becomes -2


def test_score_adds_extra_reward_functions_and_checks_its_inputs():
    completions = [f"<think>{DOG}</think><answer>B</answer>", "A", "B"]
    out = score(completions, ["B"] * 3, {"short": lambda c, s: 1.0 if len(c) < 5 else 0.0})
    assert out["accuracy"].tolist() == [1, 0, 1]
    assert out["format"].tolist() == pytest.approx([0.505, 0, 0])
    assert out["short"].tolist() == [0, 1, 1]
    assert out["reward"].tolist() == pytest.approx([1.505, -2 + 1, 1 + 1])
    assert out["reward"].dtype == torch.float32 and set(out) == {"reward", "accuracy", "format", "short"}
    with pytest.raises(ValueError, match="2 completions but 1 solutions"):
        score(["A", "B"], ["B"])
    with pytest.raises(ValueError, match="format"):
        score(["A"], ["B"], {"format": format_reward})


# ----------------------------------------------------------------------------- advantages


def test_group_advantages_by_hand_for_each_scale():
    r = torch.tensor([2.0, -2, 2, -2, 1, 1, 1, 1])
    group = 2 / (math.sqrt(16 / 3) + 1e-4)  # group 0: mean 0, unbiased std sqrt(4 * 4 / 3)
    batch = 2 / (math.sqrt(18 / 7) + 1e-4)  # all 8: mean 0.5, squared deviations 4 * 2.25 + ... = 18
    want = lambda a: [a, -a, a, -a, 0, 0, 0, 0]  # noqa: E731
    assert group_advantages(r, 4, noise_std=0).tolist() == pytest.approx(want(group), abs=1e-6)
    assert group_advantages(r, 4, noise_std=0, scale="batch").tolist() == pytest.approx(want(batch), abs=1e-6)
    assert group_advantages(r, 4, noise_std=0, scale="none").tolist() == want(2.0)
    assert group_advantages(r, 4, noise_std=0)[4:].eq(0).all()  # equal rewards: exactly no signal without noise


def test_group_advantages_properties_and_noise():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(64, generator=g) * 3 + 1
    a = group_advantages(r, 8, noise_std=0).view(8, 8)
    assert a.sum(1).abs().max() <= 1e-5  # centred per group
    assert (a.std(1) - 1).abs().max() <= 1e-3  # unit unbiased std per group (up to the 1e-4)
    assert torch.allclose(group_advantages(5 * r - 7, 8, noise_std=0).view(8, 8), a, atol=1e-3)  # shift/scale invariant
    assert torch.equal(torch.sign(a.flatten()), torch.sign(r.view(8, 8) - r.view(8, 8).mean(1, keepdim=True)).flatten())
    # Noise: deterministic under a generator, std 0.02, and it moves groups of equal rewards.
    flat = torch.zeros(4000)
    n1 = group_advantages(flat, 4, generator=torch.Generator().manual_seed(1))
    n2 = group_advantages(flat, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(n1, n2) and 0.018 <= n1.std().item() <= 0.022 and abs(n1.mean().item()) <= 2e-3
    with pytest.raises(ValueError, match="multiple of group_size 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(8), 4, scale="std")


def test_zero_variance_groups_marks_every_row_of_flat_groups():
    r = torch.tensor([1.0, 1, 1, -2, -2, -2, 1, 2, 1])
    assert zero_variance_groups(r, 3).tolist() == [True] * 6 + [False] * 3


def test_temporal_bonus_rewards_correct_answers_that_need_the_order():
    ordered = torch.tensor([1.0, 1, 0, 1,  # 0.75 >= 0.8 * 0.5: bonus on the correct ones
                            1, 0, 0, 0,  # 0.25 < 0.8 * 1.0: nothing
                            1, 0, 1, 0])  # 0.5 >= 0.8 * 0.625 exactly: bonus
    shuffled = torch.tensor([1.0, 0, 1, 0, 1, 0, 1, 0,  # 8 shuffled rollouts per prompt: 0.5
                             1, 1, 1, 1, 1, 1, 1, 1,  # 1.0
                             1, 1, 1, 1, 1, 0, 0, 0])  # 0.625
    with pytest.raises(ValueError, match="same 3 prompts"):
        temporal_bonus(ordered, shuffled[:7], 4)
    got = temporal_bonus(ordered, shuffled, 4)
    assert got.tolist() == pytest.approx([0.3, 0.3, 0, 0.3, 0, 0, 0, 0, 0.3, 0, 0.3, 0])
    assert temporal_bonus(ordered[:4], torch.tensor([1.0, 1]), 4, bonus=0.5, ratio=0.5).tolist() == [0.5, 0.5, 0, 0.5]


def test_shuffle_frames_permutes_each_row_differently():
    x = torch.arange(2 * 16).float().view(2, 16, 1, 1, 1).expand(2, 16, 3, 2, 2)
    y = shuffle_frames(x, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    for b in range(2):
        frames = y[b, :, 0, 0, 0]
        assert sorted(frames.tolist()) == x[b, :, 0, 0, 0].tolist()  # the same frames, each once
        assert (y[b] == frames.view(16, 1, 1, 1)).all()  # whole frames move, never pixels
        assert not torch.equal(frames, x[b, :, 0, 0, 0])
    assert not torch.equal(y[0, :, 0, 0, 0] - y[0, :, 0, 0, 0].min(), y[1, :, 0, 0, 0] - y[1, :, 0, 0, 0].min())


# ----------------------------------------------------------------------------- rollouts and log-probs


def prompts(P=2, L=6, seed=1):
    ids = torch.randint(1, 40, (P, L), generator=torch.Generator().manual_seed(seed))
    ids[:, 2] = M.IMAGE_TOKEN_INDEX
    return ids


EOS = 0


def naive_greedy(model, ids, pixels, n):
    """No cache: the full forward on the whole sequence for every new token."""
    out = []
    for b in range(ids.shape[0]):
        seq = ids[b:b + 1]
        for _ in range(n):
            nxt = model(seq, pixels[b:b + 1])[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
            if nxt.item() == EOS:
                break
        out.append(seq[0, ids.shape[1]:])
    return out


@pytest.mark.slow
def test_greedy_cached_rollout_equals_naive_generation():
    model = tiny_model()
    ids, pixels = prompts(), torch.randn(2, 2, 3, 16, 16)
    with torch.no_grad():
        r = rollout(model, ids, model.encode_video(pixels), eos_id=EOS, group_size=3, max_new_tokens=12, temperature=0)
        want = naive_greedy(model, ids, pixels, 12)
    assert r.completion_ids.shape[0] == 6
    for row in range(6):
        n = int(r.mask[row].sum())
        assert r.completion_ids[row, :n].tolist() == want[row // 3].tolist()
    assert r.truncated.tolist() == [len(want[row // 3]) == 12 and want[row // 3][-1].item() != EOS for row in range(6)]


def test_rollout_decodes_only_through_decode_step():
    """The seam a compiled step replaces: every token after the first comes from decode_step."""
    model = tiny_model(1)
    lm, calls = model.language_model, []
    step = lm.decode_step
    lm.decode_step = lambda tokens, cache: calls.append(tokens.shape) or step(tokens, cache)
    r = rollout(model, prompts(), model.encode_video(torch.randn(2, 2, 3, 16, 16)), eos_id=99, group_size=2, max_new_tokens=5)
    assert r.completion_ids.shape == (4, 5) and r.truncated.all()  # eos 99 never comes
    assert calls == [torch.Size([4])] * 4


def test_left_padded_prompts_roll_out_like_single_prompts():
    model = tiny_model(2)
    pixels = torch.randn(2, 2, 3, 16, 16)
    a, b = prompts(1, 7, seed=3), prompts(1, 4, seed=4)
    batch = torch.cat([a, F.pad(b, (3, 0), value=9)])
    mask = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
    video = model.encode_video(pixels)
    both = rollout(model, batch, video, eos_id=EOS, attention_mask=mask, group_size=2, max_new_tokens=8, temperature=0)
    alone = rollout(model, b, video[1:], eos_id=EOS, group_size=2, max_new_tokens=8, temperature=0)
    n = alone.completion_ids.shape[1]
    assert torch.equal(both.completion_ids[2:, :n], alone.completion_ids)
    with pytest.raises(ValueError, match="left-padded"):
        rollout(model, batch, video, eos_id=EOS, attention_mask=mask.flip(1), group_size=2, max_new_tokens=2)


def test_sampled_logprobs_match_a_full_forward_and_masks_end_at_eos():
    model = tiny_model(5)
    ids, pixels = prompts(), torch.randn(2, 2, 3, 16, 16)
    video = model.encode_video(pixels)
    g = torch.Generator().manual_seed(6)
    r = rollout(model, ids, video, eos_id=EOS, group_size=4, max_new_tokens=10, temperature=0.7, top_k=5, top_p=0.9, generator=g)
    with torch.no_grad():
        lp = completion_logprobs(model, ids, video, r.completion_ids, r.mask, temperature=0.7, chunk=3)
    assert (lp - r.logprobs).abs().max() <= 1e-4
    for row, m in zip(r.completion_ids, r.mask):
        eos_at = (row == EOS).nonzero()
        n = eos_at[0].item() + 1 if len(eos_at) else row.shape[0]
        assert m.tolist() == [1.0] * n + [0.0] * (row.shape[0] - n)
    assert completion_mask(torch.tensor([[3, 0, 0, 5], [1, 2, 3, 4]]), 0).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rollouts_are_the_same_whatever_the_batch(temperature):
    """A prompt's completions depend on its seed, not on which prompts decode beside it: 4 prompts
    of different lengths (left-padded together) in one batch == each alone, greedy and sampled,
    while finished rows leave the batch (eos is common here, so most rows finish early)."""
    model = tiny_model(6)
    ids = [prompts(1, L, seed=20 + L) for L in (5, 8, 6, 9)]
    video = model.encode_video(torch.randn(4, 2, 3, 16, 16, generator=torch.Generator().manual_seed(8)))
    batch = torch.cat([F.pad(x, (9 - x.shape[1], 0), value=1) for x in ids])
    mask = torch.cat([F.pad(torch.ones_like(x), (9 - x.shape[1], 0)) for x in ids])
    seeds = torch.tensor([11, 12, 13, 14])
    probe = rollout(model, batch, video, eos_id=-1, attention_mask=mask, seeds=seeds, group_size=4, max_new_tokens=12,
                    temperature=temperature, top_k=10)
    eos = int(probe.completion_ids.mode().values.mode().values)  # a token most rows make early on
    shapes = []
    step = model.language_model.decode_step
    decode = lambda tokens, cache: shapes.append(len(tokens)) or step(tokens, cache)
    kw = dict(eos_id=eos, group_size=4, max_new_tokens=40, temperature=temperature, top_k=10, check_every=4)
    together = rollout(model, batch, video, attention_mask=mask, seeds=seeds, decode=decode, **kw)
    assert min(shapes) < 16 and shapes[0] == 16, "finished rows should have left the batch"
    for p in range(4):
        alone = rollout(model, ids[p], video[p:p + 1], seeds=seeds[p:p + 1], **kw)
        rows = slice(4 * p, 4 * p + 4)
        T = alone.completion_ids.shape[1]
        assert torch.equal(together.completion_ids[rows, :T] * together.mask[rows, :T], alone.completion_ids * alone.mask)
        assert torch.equal(together.mask[rows, :T], alone.mask) and together.mask[rows, T:].sum() == 0
        assert torch.equal(together.truncated[rows], alone.truncated)
        assert (together.logprobs[rows, :T] - alone.logprobs).abs().max() <= 1e-5
    if temperature:
        assert len({tuple(r.tolist()) for r in together.completion_ids}) > 4, "samples of a prompt should differ"


def test_sampling_draws_from_the_distribution():
    """The Gumbel-max draw with hashed noise: frequencies over 100,000 keys match the probabilities."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(100_000, 1)
    tok, _ = sample_token(logits, 1.0, top_k=0, keys=torch.arange(100_000))
    freq = torch.bincount(tok, minlength=4) / 100_000
    assert (freq - torch.tensor([0.5, 0.3, 0.15, 0.05])).abs().max() < 0.006


def test_sample_token_top_k_and_top_p_cut_the_tail():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(7)
    tok, lp = sample_token(logits, 1.0, top_k=2, top_p=1.0, generator=g)
    assert set(tok.tolist()) == {0, 1}
    assert torch.allclose(lp, logits[0].log_softmax(-1)[tok])
    tok, _ = sample_token(logits, 1.0, top_k=0, top_p=0.7, generator=g)  # 0.5 + 0.3 reaches 0.7
    assert set(tok.tolist()) == {0, 1}
    tok, _ = sample_token(logits, 1.0, top_k=0, top_p=1.0, generator=g)
    assert set(tok.tolist()) == {0, 1, 2, 3}
    assert sample_token(logits[:1], 0)[0].item() == 0


def test_reference_log_probs_see_the_video_and_gradients_flow_to_the_connector():
    model = tiny_model(8)
    ids = prompts()
    comp = torch.randint(1, 40, (4, 5), generator=torch.Generator().manual_seed(9))
    mask = torch.ones(4, 5)
    with torch.no_grad():
        v1 = model.encode_video(torch.randn(2, 2, 3, 16, 16))
        v2 = model.encode_video(torch.randn(2, 2, 3, 16, 16))
        assert (completion_logprobs(model, ids, v1, comp, mask) - completion_logprobs(model, ids, v2, comp, mask)).abs().max() > 1e-3
    feats = model.vision_features(torch.randn(2, 2, 3, 16, 16)).detach()
    lp = completion_logprobs(model, ids, model.connect(feats), comp, mask, chunk=2)
    lp.sum().backward()
    assert model.connector.latents.grad is not None and model.connector.latents.grad.abs().sum() > 0
    assert model.language_model.model.embed_tokens.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- the loss

LN2 = math.log(2)
K_UP, K_DOWN = 1 - LN2, LN2 - 0.5  # k3 KL at ref - logp = ln 2 and -ln 2; d kl / d logp = 1 - e^(ref - logp) = -1 and 0.5


def toy_batch():
    """2 completions of 3 tokens, the last token of row 0 after its eos; ref - logp is ln 2, 0, or -ln 2."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.5]], requires_grad=True)
    ref = logp.detach() + torch.tensor([[LN2, 0.0, 5.0], [-LN2, LN2, 0.0]])  # 5.0 sits under the mask
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1]])
    return logp, ref, torch.tensor([1.0, -2.0]), mask


# Worked on paper with beta = 0.1. Per-token loss -A + 0.1 kl:
#   row 0: -1 + 0.1 K_UP, -1;   row 1: 2 + 0.1 K_DOWN, 2 + 0.1 K_UP, 2.
# Per-token gradient -A + 0.1 (1 - e^(ref - logp)):  row 0: -1.1, -1;   row 1: 2.05, 1.9, 2.
ROW0, ROW1 = -2 + 0.1 * K_UP, 6 + 0.1 * (K_DOWN + K_UP)
TOKEN_GRAD = torch.tensor([[-1.1, -1.0, 0.0], [2.05, 1.9, 2.0]])
WANT = {  # loss_type -> (loss, what each token's gradient is divided by)
    "grpo": ((ROW0 / 2 + ROW1 / 3) / 2, torch.tensor([[4.0], [6.0]])),
    "bnpo": ((ROW0 + ROW1) / 5, torch.tensor([[5.0], [5.0]])),
    "dapo": ((ROW0 + ROW1) / 5, torch.tensor([[5.0], [5.0]])),
    "dr_grpo": ((ROW0 + ROW1) / 6, torch.tensor([[6.0], [6.0]])),
}


@pytest.mark.parametrize("loss_type", sorted(WANT))
def test_every_loss_type_on_a_hand_computed_batch(loss_type):
    logp, ref, adv, mask = toy_batch()
    loss, metrics = grpo_loss(logp, None, ref, adv, mask, beta=0.1, loss_type=loss_type)
    want_loss, divisor = WANT[loss_type]
    assert loss.item() == pytest.approx(want_loss, abs=1e-6) and metrics["loss"] == pytest.approx(want_loss, abs=1e-6)
    loss.backward()
    assert torch.allclose(logp.grad, TOKEN_GRAD / divisor, atol=1e-6)  # 0 on the token after eos
    assert metrics["kl"] == pytest.approx((2 * K_UP + K_DOWN) / 5, abs=1e-6) and metrics["clip_ratio"] == 0


def test_dr_grpo_divides_by_the_given_max_completion_length():
    logp, ref, adv, mask = toy_batch()
    loss, _ = grpo_loss(logp, None, ref, adv, mask, beta=0.1, loss_type="dr_grpo", max_completion_length=4)
    assert loss.item() == pytest.approx((ROW0 + ROW1) / 8, abs=1e-6)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logp, None, ref, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="advantages has shape"):
        grpo_loss(logp, None, ref, adv[:1], mask)


def test_without_reference_or_beta_there_is_no_kl_term():
    logp, ref, adv, mask = toy_batch()
    for r, beta in ((None, 0.1), (ref, 0.0)):
        loss, metrics = grpo_loss(logp, None, r, adv, mask, beta=beta)
        assert loss.item() == pytest.approx((-2 / 2 + 6 / 3) / 2, abs=1e-6)
    assert metrics["kl"] == pytest.approx((2 * K_UP + K_DOWN) / 5, abs=1e-6)  # still measured when beta is 0
    assert grpo_loss(logp, None, None, adv, mask)[1]["kl"] == 0.0


def test_truncated_completions_drop_out_of_the_loss():
    logp, ref, adv, mask = toy_batch()
    loss, _ = grpo_loss(logp, None, ref, adv, mask, beta=0.1, truncated=torch.tensor([False, True]))
    assert loss.item() == pytest.approx(ROW0 / 2 / 2, abs=1e-6)  # TRL's "grpo": still divided by N = 2
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-1.1 / 4, -1 / 4, 0], [0, 0, 0]]), atol=1e-6)


def test_clipping_with_an_old_policy():
    # ratio = exp(logp - old): 1.5 and 0.5 in each row; row 0 has A = +1, row 1 has A = -1.
    logp = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]], requires_grad=True)
    old = logp.detach() - torch.log(torch.tensor([[1.5, 0.5], [1.5, 0.5]]))
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 2)
    loss, metrics = grpo_loss(logp, old, None, adv, mask)
    # min(r A, clip(r) A): row 0 -> 1.2 (clipped, no gradient), 0.5;  row 1 -> -1.5, -0.8 (clipped, no gradient)
    assert loss.item() == pytest.approx(((-1.2 - 0.5) / 2 + (1.5 + 0.8) / 2) / 2, abs=1e-6)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -0.5 / 4], [1.5 / 4, 0.0]]), atol=1e-6)
    assert metrics["clip_ratio"] == 0.5
    # A higher upper bound (DAPO's clip-higher) lets ratio 1.5 with A > 0 through.
    loss, metrics = grpo_loss(logp, old, None, adv, mask, epsilon_high=0.6)
    assert metrics["clip_ratio"] == 0.25 and loss.item() == pytest.approx(((-1.5 - 0.5) / 2 + (1.5 + 0.8) / 2) / 2, abs=1e-6)


def test_per_token_kl_is_clamped_as_the_original():
    # ref - logp = 10, -200, 0.5: k3 = e^10 - 11 (~22015) and e^-200 + 199 (~199) are clamped to 100, with no
    # gradient; the third, e^0.5 - 1.5, is not. A = 0 leaves only the KL term.
    logp = torch.zeros(1, 3, requires_grad=True)
    ref, adv, mask = torch.tensor([[10.0, -200.0, 0.5]]), torch.zeros(1), torch.ones(1, 3)
    k = math.exp(0.5) - 1.5
    loss, metrics = grpo_loss(logp, None, ref, adv, mask, beta=0.1)
    assert metrics["kl"] == pytest.approx((200 + k) / 3, rel=1e-6) and loss.item() == pytest.approx(0.1 * (200 + k) / 3, rel=1e-6)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.0, 0.0, 0.1 * (1 - math.exp(0.5)) / 3]]), atol=1e-7)
    _, metrics = grpo_loss(logp, None, ref, adv, mask, beta=0.1, kl_clamp=None)
    assert metrics["kl"] == pytest.approx((math.exp(10) - 11 + math.exp(-200) + 199 + k) / 3, rel=1e-5)


def test_kl_is_exactly_zero_when_the_reference_is_the_policy():
    model = tiny_model(3)
    ref_model = copy.deepcopy(model).requires_grad_(False)
    ids, pixels = prompts(), torch.randn(2, 2, 3, 16, 16)
    comp = torch.randint(1, 40, (4, 6), generator=torch.Generator().manual_seed(2))
    mask = completion_mask(comp, 7)
    logp = completion_logprobs(model, ids, model.encode_video(pixels), comp, mask, chunk=4)
    with torch.no_grad():
        ref = completion_logprobs(ref_model, ids, ref_model.encode_video(pixels), comp, mask)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    loss, metrics = grpo_loss(logp, None, ref, adv, mask, beta=0.5)
    assert metrics["kl"] == 0.0
    grad = torch.autograd.grad(loss, logp)[0]
    loss0, _ = grpo_loss(logp, None, None, adv, mask)
    assert loss.item() == loss0.item() and torch.equal(grad, torch.autograd.grad(loss0, logp)[0])


def test_one_grpo_step_on_a_tiny_model():
    """The whole recipe once: the logged loss is ~0 by construction, yet the step raises the
    log-probs of the completions with positive advantage against the others."""
    model = tiny_model(4)
    ref_model = copy.deepcopy(model).requires_grad_(False)
    ids, pixels = prompts(), torch.randn(2, 2, 3, 16, 16)
    with torch.no_grad():
        video = model.encode_video(pixels)
    r = rollout(model, ids, video, eos_id=EOS, group_size=4, max_new_tokens=8, generator=torch.Generator().manual_seed(3))
    rewards = ((r.completion_ids == 5) * r.mask).sum(1) - ((r.completion_ids == 6) * r.mask).sum(1)  # a toy reward from token ids
    adv = group_advantages(rewards.float(), 4, noise_std=0)
    assert adv.abs().sum() > 0

    def objective():  # sum_i A_i * mean_t logp_i: what the step should raise
        lp = completion_logprobs(model, ids, video, r.completion_ids, r.mask)
        return lp, ((lp.sum(1) / r.mask.sum(1)) * adv).sum()

    lp, before = objective()
    with torch.no_grad():
        ref = completion_logprobs(ref_model, ids, ref_model.encode_video(pixels), r.completion_ids, r.mask)
    loss, metrics = grpo_loss(lp, None, ref, adv, r.mask, truncated=None)
    assert abs(metrics["loss"]) < 1e-6 and metrics["kl"] == 0.0  # -mean(A) + beta * 0
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-3 * p.grad
        after = objective()[1]
    assert after > before


# ----------------------------------------------------------------------------- metrics


def test_step_metrics_by_hand():
    long_wait = "<think>Wait, " + "x" * 1194 + "</think>"  # 1200 characters of thinking: format 1
    completions = [long_wait + "<answer>B</answer>",  # acc 1, fmt 1 -> 2
                   "<think>" + "x" * 1200 + "</think><answer>A</answer>",  # acc 0, fmt 1 -> -1
                   "B",  # acc 1, fmt 0 -> 1
                   "Let me RE-CHECK: A",  # acc 0, fmt 0 -> -2
                   "B", "B"]  # a group of equal rewards
    scores = score(completions, ["B"] * 6)
    assert scores["reward"].tolist() == [2, -1, 1, -2, 1, 1]
    lengths = [3, 5, 2, 5, 4, 1]
    mask = torch.tensor([[1.0] * n + [0.0] * (5 - n) for n in lengths])
    r = Rollout(torch.zeros(6, 5, dtype=torch.long), mask, torch.zeros(6, 5),
                torch.tensor([False, True, False, True, False, False]), 2)
    got = step_metrics(r, completions, scores, 2, kl=0.01, times={"rollout": 2.0, "policy": 0.5})
    want = {"reward": 1 / 3, "reward_std": math.sqrt(2),  # groups' stds: 3/sqrt(2), 3/sqrt(2), 0
            "reward/accuracy": 4 / 6, "reward/format": 2 / 6, "accuracy": 4 / 6, "format": 2 / 6,
            "completion_length": 20 / 6, "completion_length_min": 1, "completion_length_max": 5,
            "truncated": 2 / 6, "zero_std_groups": 1 / 3, "reflection": 2 / 6, "kl": 0.01,
            "time/rollout": 2.0, "time/policy": 0.5, "tokens_per_s": 6 * 5 / 2.0}
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-6), k
        assert type(got[k]) is float, k
    assert set(step_metrics(r, completions, scores, 2)) == set(want) - {"kl", "time/rollout", "time/policy", "tokens_per_s"}


@pytest.mark.parametrize("text, reflects", [
    ("Wait, the man sat first.", True), ("hmm... wait.", True), ("Let me re-check the frames.", True),
    ("Rechecking: B.", True), ("Let me reconsider.", True), ("They await the bus.", False),
    ("The man is waiting.", False), ("Let me consider B.", False), ("", False),
])
def test_reflection_share_counts_aha_phrases(text, reflects):
    r = Rollout(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), torch.zeros(2, 1), torch.zeros(2, dtype=torch.bool), 2)
    got = step_metrics(r, [text, "B"], score([text, "B"], ["B", "B"]), 2)["reflection"]
    assert got == (0.5 if reflects else 0.0)


# ----------------------------------------------------------------------------- fast decoding and the sampler
# On CPU, torch.compile only: CUDA graphs are exercised by bench.py on a GPU.


class GraphCounter:
    """A torch.compile backend that runs the captured graph as is and counts the graphs."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.usefixtures("one_thread")
def test_decode_step_is_one_graph_for_every_step_and_cache():
    """What a CUDA graph needs: every step, on any cache of the same shape, is the same graph, and
    fullgraph=True means no graph breaks, so no host syncs (.item(), branches on values) inside."""
    model = tiny_model(size="tiny")
    lm = model.language_model
    ids, video = tiny_prompt(model)
    embeds, mask = model.embed(ids, video)
    counter = GraphCounter()
    step = torch.compile(lm.step_logits, backend=counter, fullgraph=True)
    with torch.no_grad():
        for _ in range(2):  # two rollouts, two caches
            cache = model.new_cache(1, embeds.shape[1] + 6)
            lm.model(embeds, mask, cache)
            cache, twin = cache.repeat_interleave(3), cache.repeat_interleave(3)
            tok = torch.arange(3)
            for t in range(6):
                cache.reserve(1)
                got = step(tok, cache)
                want = lm.decode_step(tok, twin)
                assert torch.equal(got, want), t
                tok = got.argmax(-1)
            assert cache.length == twin.length == embeds.shape[1] + 6 == int(cache.pos)
            assert all(map(torch.equal, cache.k + cache.v, twin.k + twin.v)) and torch.equal(cache.valid, twin.valid) and torch.equal(cache.next_pos, twin.next_pos)
    assert counter.graphs == 1


@pytest.mark.slow  # compiles
@pytest.mark.usefixtures("one_thread")
@pytest.mark.filterwarnings("error:torch.compile of the decode step failed")  # no silent fallback to eager
def test_compiled_rollout_samples_what_the_eager_one_does():
    """torch.compile (inductor) of the decode step, through grpo.rollout: greedy, 2 prompts x 8
    samples, 24 steps with an eos that some rows reach, so the early-stop check runs 3 times."""
    import torch._dynamo.utils
    torch._dynamo.reset()  # a fresh budget of 8 recompilations: every earlier test's model counted against it
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    model = tiny_model(size="tiny")
    ids, video = tiny_prompt(model)
    ids, video = ids.repeat(2, 1), torch.cat([video, video.flip(1)])  # two prompts that differ
    with torch.no_grad():
        probe = rollout(model, ids, video, eos_id=-1, pad_id=0, group_size=8, max_new_tokens=24, temperature=0)
        # eos: a token the first prompt's samples make after a few steps and the second's never do
        seen = set(probe.completion_ids[8].tolist())
        eos = next(int(t) for t in probe.completion_ids[0, 4:] if int(t) not in seen)
        eager = rollout(model, ids, video, eos_id=eos, pad_id=0, group_size=8, max_new_tokens=24, temperature=0)
        fast = rollout(model, ids, video, eos_id=eos, pad_id=0, group_size=8, max_new_tokens=24, temperature=0,
                       decode=G.FastDecode(model.language_model))
    assert eager.mask.sum(1).min() < 24 and eager.truncated.any()  # some rows stopped early, some did not
    assert torch.equal(fast.completion_ids, eager.completion_ids)
    assert torch.equal(fast.mask, eager.mask) and torch.equal(fast.truncated, eager.truncated)
    assert (fast.logprobs - eager.logprobs).abs().max() <= 1e-4
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # it did compile


def prefilled(model, room=1):
    """A KV cache holding bench.py's tiny prompt, with room for `room` more tokens."""
    ids, video = tiny_prompt(model)
    embeds, mask = model.embed(ids, video)
    cache = model.new_cache(1, embeds.shape[1] + room)
    with torch.no_grad():
        model.language_model.model(embeds, mask, cache)
    return cache


@pytest.mark.usefixtures("one_thread")
def test_fast_step_keeps_the_cache_bounds_check():
    model = tiny_model(size="tiny")
    fast = G.FastDecode(model.language_model, compile=False)
    cache = prefilled(model)
    with torch.no_grad():
        fast(torch.zeros(1, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="KV cache full"):
            fast(torch.zeros(1, dtype=torch.long), cache)


@pytest.mark.usefixtures("one_thread")
def test_fast_step_falls_back_to_eager_when_compiling_fails():
    """A machine where torch.compile cannot build (no C++ compiler) still trains: a warning, then eager."""
    model = tiny_model(size="tiny")
    lm = model.language_model
    fast = G.FastDecode(lm, compile=True)

    def broken(tokens, cache):
        raise RuntimeError("InductorError: no working C++ compiler found\ndetails")

    fast.fns = {name: broken for name in fast.fns}
    caches = [prefilled(model), prefilled(model)]
    with torch.no_grad():
        with pytest.warns(UserWarning, match="no working C\\+\\+ compiler"):
            got = fast(torch.zeros(1, dtype=torch.long), caches[0])
        assert torch.equal(got, lm.decode_step(torch.zeros(1, dtype=torch.long), caches[1]))


@pytest.mark.usefixtures("one_thread")
def test_bf16_sampler_shares_the_tower_and_refreshes_in_place():
    """The GPU layout, run on the CPU: the sampler is a bf16 copy of connector + decoder (the vision
    tower shared, not copied) with a bf16 cache, and refresh() copies the policy in without moving
    a tensor (a captured CUDA graph keeps reading the same addresses)."""
    policy = tiny_model(size="tiny")
    sampler = G.Sampler(policy, torch.bfloat16)
    assert sampler.model.vision_tower is policy.vision_tower
    lm = sampler.model.language_model
    assert lm.model.embed_tokens.weight.dtype == torch.bfloat16 and policy.language_model.model.embed_tokens.weight.dtype == torch.float32
    addresses = [p.data_ptr() for p in sampler.model.parameters()]
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01)
    sampler.refresh()
    assert [p.data_ptr() for p in sampler.model.parameters()] == addresses
    for (name, mine), master in zip(sampler.model.named_parameters(), policy.parameters()):
        assert torch.equal(mine, master.to(mine.dtype)), name
    ids, pixels = bench.inputs(policy.config, bench.TINY, torch.device("cpu"), seed=1)
    with torch.no_grad():
        r = sampler.rollout(ids, policy.vision_features(pixels), eos_id=-1, group_size=4, max_new_tokens=5, temperature=0)
    assert r.completion_ids.shape == (4, 5)
    assert sampler.model.new_cache(1, 4).k[0].dtype == torch.bfloat16


def test_prompt_shared_by_its_group_equals_the_whole_sequence_per_sample():
    """completion_logprobs computes a prompt once for its G samples (a KV cache the completions attend
    to) unless the layers are checkpointed; both ways give the same log-probs and gradients, with a
    left-padded prompt and completions that end early."""
    model = tiny_model(3).train()
    ids = prompts(2, 7, seed=9)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, :2] = False
    video = model.encode_video(torch.randn(2, 2, 3, 16, 16, generator=torch.Generator().manual_seed(4))).detach()
    comp = torch.randint(1, 40, (6, 9), generator=torch.Generator().manual_seed(5))
    cmask = torch.ones(6, 9)
    cmask[0, 5:] = cmask[4, 2:] = 0
    out, shapes, forward = [], [], model.language_model.model.forward
    model.language_model.model.forward = lambda x, m=None, cache=None: shapes.append(x.shape[0]) or forward(x, m, cache)
    for checkpointed in (True, False):
        model.zero_grad()
        model.language_model.model.gradient_checkpointing = checkpointed
        lp = completion_logprobs(model, ids, video, comp, cmask, mask)
        lp.sum().backward()
        out.append((lp.detach(), [p.grad.clone() for p in model.language_model.parameters()]))
    (a, ga), (b, gb) = out
    assert shapes == [6, 2, 6]  # 6 whole sequences; then the 2 prompts once, and the 6 completions on them
    assert (a - b).abs().max() <= 1e-5
    assert all((x - y).abs().max() <= 1e-5 * (1 + x.abs().max()) for x, y in zip(ga, gb))


class EmulatedCudaGraph:
    """torch.cuda.CUDAGraph on the CPU, as FastDecode uses it: `with torch.cuda.graph(g)` records the ops
    (aten level, through a dispatch mode) and leaves no trace, as a capture runs no kernel (the tensors it
    writes are put back, the tensors it makes hold NaN); `replay()` runs the recorded ops again on the same
    tensors (the same addresses: results are copied into the captured outputs, views alias as they did)."""

    def __init__(self):
        self.ops = []

    @contextlib.contextmanager
    def capture(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        graph, saved = self, {}

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                assert func is not torch.ops.aten._local_scalar_dense.default, "a host sync inside a CUDA graph"
                schema = func._schema
                for i, a in enumerate(schema.arguments):  # what the op writes: put back after the capture
                    value = args[i] if i < len(args) else kwargs.get(a.name)
                    if a.alias_info is not None and a.alias_info.is_write and isinstance(value, torch.Tensor):
                        saved.setdefault(id(value), (value, value.clone()))
                out = func(*args, **kwargs)
                view = any(r.alias_info is not None for r in schema.returns)
                graph.ops.append((func, args, kwargs, None if view else out))
                return out

        with Record():
            yield
        for t, before in saved.values():
            t.copy_(before)
        for *_, out in self.ops:
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and id(t) not in saved:
                    t.fill_(float("nan"))

    def replay(self):
        for func, args, kwargs, out in self.ops:
            new = func(*args, **kwargs)
            if out is not None:
                for t, n in zip(torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(new)):
                    if isinstance(t, torch.Tensor):
                        t.copy_(n)


def emulate_cuda_graphs(monkeypatch):
    """FastDecode's CUDA-graph path on the CPU: streams do nothing, graphs are EmulatedCudaGraph."""
    stream = types.SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", EmulatedCudaGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g: g.capture())


@pytest.mark.usefixtures("one_thread")
def test_cuda_graph_decode_replays_what_the_eager_step_does(monkeypatch):
    """FastDecode's capture-and-replay, run on the CPU with an emulated CUDA graph: the warm-up step before the
    capture must leave the cache as it found it, and each new cache (rows leaving the batch) a new capture.
    A rollout through it, 2 prompts x 4 samples with an eos some rows reach, equals the eager one."""
    emulate_cuda_graphs(monkeypatch)
    model = tiny_model(size="tiny")
    ids, video = tiny_prompt(model)
    ids, video = ids.repeat(2, 1), torch.cat([video, video.flip(1)])
    with torch.no_grad():
        probe = rollout(model, ids, video, eos_id=-1, pad_id=0, group_size=4, max_new_tokens=12, temperature=0)
        seen = set(probe.completion_ids[4].tolist())
        eos = next(int(t) for t in probe.completion_ids[0, 2:] if int(t) not in seen)
        eager = rollout(model, ids, video, eos_id=eos, pad_id=0, group_size=4, max_new_tokens=12, temperature=0, check_every=4)
        fast = G.FastDecode(model.language_model, compile=False, cuda_graph=True)
        graphed = rollout(model, ids, video, eos_id=eos, pad_id=0, group_size=4, max_new_tokens=12, temperature=0,
                          decode=fast, check_every=4)
    assert eager.truncated.any() and not eager.truncated.all()  # some rows left the batch early
    assert torch.equal(graphed.completion_ids, eager.completion_ids) and torch.equal(graphed.mask, eager.mask)
    assert (graphed.logprobs - eager.logprobs).abs().max() <= 1e-5
