"""The routing maths of a ModelService: splits, stickiness, reweighting, shadow, reasoning, dynamic."""

import random

import pytest

from anneal.serve.routing import (
    DynamicPolicy,
    LargeShareTracker,
    ReasoningPolicy,
    RoutingError,
    RoutingPolicy,
    apply_reasoning,
    cap_max_tokens,
    decide,
    difficulty_score,
    dynamic_choice,
    hash_position,
    line_order,
    normalise_weights,
    pick_on_line,
    resolve_reasoning,
)


def route(policy, headers=None, messages=None, rng=None, tracker=None, prompt=None):
    rng = rng or random.Random(0)
    return decide(policy, headers=headers or {}, messages=messages, prompt=prompt, draw=rng.random(),
                  shadow_draw=rng.random(), tracker=tracker)


@pytest.mark.parametrize("weights", [{"a": 90, "b": 10}, {"a": 50, "b": 50}, {"a": 1, "b": 99},
                                     {"a": 20, "b": 30, "c": 50}, {"x": 33, "y": 33, "z": 34}])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_split_is_within_one_point_over_10k_draws(weights, seed):
    policy = RoutingPolicy(weights=weights)
    rng = random.Random(seed)
    counts = {v: 0 for v in weights}
    for _ in range(10_000):
        d = route(policy, rng=rng)
        assert d.reason == "weighted"
        counts[d.variant] += 1
    for v, w in weights.items():
        assert abs(counts[v] / 100 - w) <= 1.0, (v, counts)


def test_zero_weight_variant_never_gets_weighted_traffic():
    policy = RoutingPolicy(weights={"a": 100, "b": 0})
    rng = random.Random(3)
    assert {route(policy, rng=rng).variant for _ in range(5000)} == {"a"}


def test_sticky_key_always_gets_the_same_variant_and_users_split_by_weight():
    policy = RoutingPolicy(weights={"a": 90, "b": 10}, sticky_header="x-user-id")
    rng = random.Random(1)
    first = {}
    for i in range(20_000):
        user = f"user-{i % 2000}"
        d = route(policy, headers={"x-user-id": user}, rng=rng)
        assert d.reason == "sticky"
        assert first.setdefault(user, d.variant) == d.variant
    share_b = sum(v == "b" for v in first.values()) / len(first)
    assert abs(share_b - 0.10) < 0.025


def test_sticky_hash_is_stable_across_processes():
    # blake2b, not Python's salted hash(): the same key lands in the same place everywhere.
    assert hash_position("user-42") == pytest.approx(hash_position("user-42"))
    assert 0 <= hash_position("") < 1
    assert hash_position("user-42") == pytest.approx(int.from_bytes(
        __import__("hashlib").blake2b(b"user-42", digest_size=8).digest(), "big") / 2**64)


@pytest.mark.parametrize("before,after", [
    ({"a": 90, "b": 10}, {"a": 50, "b": 50}),
    ({"a": 50, "b": 50}, {"a": 0, "b": 100}),
    ({"stable": 95, "canary": 5}, {"stable": 75, "canary": 25}),
])
def test_reweighting_moves_only_the_share_that_must_move(before, after):
    keys = [f"k{i}" for i in range(20_000)]
    old = {k: pick_on_line(before, hash_position(k)) for k in keys}
    new = {k: pick_on_line(after, hash_position(k)) for k in keys}
    moved = [k for k in keys if old[k] != new[k]]
    must_move = sum(max(0, before[v] - after[v]) for v in before) / 100
    assert abs(len(moved) / len(keys) - must_move) < 0.01
    grown = {v for v in after if after[v] > before[v]}
    assert all(new[k] in grown for k in moved)  # nobody moves to a variant that shrank


def test_rollout_pair_are_neighbours_on_the_line_so_a_canary_step_moves_only_stable_users():
    order = line_order(["alpha", "stable", "beta", "zeta-candidate"], ("stable", "zeta-candidate"))
    assert order.index("zeta-candidate") == order.index("stable") + 1
    before = {"alpha": 20, "beta": 20, "stable": 60, "zeta-candidate": 0}
    after = {"alpha": 20, "beta": 20, "stable": 30, "zeta-candidate": 30}
    keys = [f"u{i}" for i in range(20_000)]
    moved = [k for k in keys if pick_on_line(before, hash_position(k), order) != pick_on_line(after, hash_position(k), order)]
    assert all(pick_on_line(before, hash_position(k), order) == "stable" for k in moved)
    assert abs(len(moved) / len(keys) - 0.30) < 0.01


def test_override_header_pins_a_variant_even_at_weight_zero():
    policy = RoutingPolicy(weights={"a": 100, "b": 0}, sticky_header="x-user-id")
    d = route(policy, headers={"x-anneal-variant": "b", "x-user-id": "u1"})
    assert (d.variant, d.reason) == ("b", "override")


def test_unknown_pinned_variant_is_an_error_naming_the_header():
    policy = RoutingPolicy(weights={"a": 100})
    with pytest.raises(RoutingError, match="x-anneal-variant.*'nope'") as e:
        route(policy, headers={"x-anneal-variant": "nope"})
    assert e.value.param == "x-anneal-variant"


def test_shadow_is_sampled_at_its_percent_and_never_returned():
    policy = RoutingPolicy(weights={"a": 80, "b": 20, "shadow": 0}, shadow_variant="shadow", shadow_percent=25)
    rng = random.Random(7)
    decisions = [route(policy, rng=rng) for _ in range(10_000)]
    assert all(d.variant != "shadow" for d in decisions)
    mirrored = sum(d.shadow == "shadow" for d in decisions)
    assert abs(mirrored / 100 - 25) <= 1.5


def test_no_shadow_copy_when_the_request_already_goes_to_the_shadow_variant():
    policy = RoutingPolicy(weights={"a": 50, "s": 50}, shadow_variant="s", shadow_percent=100)
    d = route(policy, headers={"x-anneal-variant": "s"})
    assert d.variant == "s" and d.shadow is None
    assert route(policy, headers={"x-anneal-variant": "a"}).shadow == "s"


ON, OFF = "detailed thinking on", "detailed thinking off"


@pytest.mark.parametrize("header,system,default,expected,source", [
    ("on", None, "off", "on", "header"),
    ("off", ON, "on", "off", "header"),           # the header beats the system message
    ("true", None, "off", "on", "header"),
    (None, ON, "off", "on", "system"),
    (None, "  Detailed Thinking OFF ", "on", "off", "system"),
    (None, "You are helpful.", "off", "off", "default"),
    (None, None, "on", "on", "default"),
    ("", None, "off", "off", "default"),           # an empty header is no header
])
def test_reasoning_resolution_table(header, system, default, expected, source):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "hi"}]
    assert resolve_reasoning(header, messages, ReasoningPolicy(default=default)) == (expected, source)


def test_bad_reasoning_header_is_an_error_naming_the_header():
    with pytest.raises(RoutingError, match="x-anneal-reasoning") as e:
        resolve_reasoning("maybe", [], ReasoningPolicy())
    assert e.value.param == "x-anneal-reasoning"


def test_reasoning_sets_the_trained_system_prompt_once():
    policy = ReasoningPolicy()
    msgs = [{"role": "system", "content": ON}, {"role": "user", "content": "2+2?"}]
    assert apply_reasoning(msgs, "off", policy) == [{"role": "system", "content": OFF},
                                                      {"role": "user", "content": "2+2?"}]
    custom = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}]
    assert apply_reasoning(custom, "on", policy)[:2] == [{"role": "system", "content": ON},
                                                          {"role": "system", "content": "Be brief."}]


@pytest.mark.parametrize("requested,default,mode,expected", [
    (None, 128, "on", 64), (None, 128, "off", 8), (500, 128, "on", 64), (4, 128, "off", 4), (20, 128, "on", 20),
])
def test_max_tokens_are_capped_by_the_mode(requested, default, mode, expected):
    policy = ReasoningPolicy(max_tokens_on=64, max_tokens_off=8)
    assert cap_max_tokens(requested, default, mode, policy) == expected
    assert cap_max_tokens(requested, default, mode, ReasoningPolicy()) == min(requested or default, default)


@pytest.mark.parametrize("text,lo,hi", [
    ("hi", 0.0, 0.05),
    ("What is 2 + 3?", 0.1, 0.3),
    ("Ana has 12 apples. She buys 5 more, gives away 3, then doubles them and sells 7. "
     "Each box holds 4. How many boxes are left after she uses 2 more and finds 9?", 0.6, 1.0),
])
def test_difficulty_score_ranks_easy_below_hard(text, lo, hi):
    assert lo <= difficulty_score(text) <= hi


def test_difficulty_score_is_bounded():
    assert difficulty_score("1 + " * 1000) == 1.0
    assert difficulty_score("") == 0.0


def test_dynamic_policy_sends_hard_requests_to_large_and_easy_ones_to_small():
    policy = RoutingPolicy(weights={"small": 50, "large": 50},
                           dynamic=DynamicPolicy(small="small", large="large", threshold=0.5))
    tracker = LargeShareTracker()
    easy = route(policy, messages=[{"role": "user", "content": "What is 2 + 3?"}], tracker=tracker)
    hard = route(policy, tracker=tracker, messages=[{"role": "user", "content":
        "Ana has 12 apples. She buys 5 more, gives away 3, doubles them, sells 7 and finds 9 more. How many?"}])
    assert easy.variant == "small" and easy.reason.startswith("dynamic:small(score=")
    assert hard.variant == "large" and hard.reason.startswith("dynamic:large(score=")
    assert hard.reason_prefix == "dynamic:large"
    assert hard.score > 0.5 > easy.score


def test_dynamic_threshold_is_strict():
    p = DynamicPolicy(small="s", large="l", threshold=0.5)
    assert dynamic_choice(0.5, p, LargeShareTracker())[0] == "s"
    assert dynamic_choice(0.51, p, LargeShareTracker())[0] == "l"


def test_large_share_cap_holds_over_a_window():
    p = DynamicPolicy(small="s", large="l", threshold=0.1, large_share=0.3, window=100)
    tracker = LargeShareTracker(p.window)
    choices = [dynamic_choice(0.9, p, tracker) for _ in range(1000)]
    large = [v for v, _ in choices[-100:]].count("l")
    assert 28 <= large <= 30
    assert any(r.startswith("dynamic:cap") for _, r in choices)
    assert tracker.share <= 0.3 + 1e-9


def test_override_beats_dynamic():
    policy = RoutingPolicy(weights={"s": 50, "l": 50}, dynamic=DynamicPolicy(small="s", large="l"))
    d = route(policy, headers={"x-anneal-variant": "l"}, messages=[{"role": "user", "content": "hi"}],
              tracker=LargeShareTracker())
    assert (d.variant, d.reason) == ("l", "override")


def test_completion_prompts_are_scored_too():
    policy = RoutingPolicy(weights={"s": 50, "l": 50}, dynamic=DynamicPolicy(small="s", large="l", threshold=0.2))
    d = route(policy, prompt="12 + 7 - 3 * 2 + 5 more and 9 times 4 then 8", tracker=LargeShareTracker())
    assert d.variant == "l"


@pytest.mark.parametrize("weights,error", [
    ({"a": 60, "b": 30}, "sum to 90"),
    ({"a": 100, "c": 0}, "weights.c: unknown variant"),
    ({"a": 50.5, "b": 49.5}, "weights.a"),
    ({"a": True, "b": 99}, "weights.a"),
])
def test_new_weights_are_validated(weights, error):
    with pytest.raises(ValueError, match=error):
        normalise_weights(weights, ["a", "b"])


def test_left_out_variants_get_zero():
    assert normalise_weights({"a": 100}, ["a", "b"]) == {"a": 100, "b": 0}
