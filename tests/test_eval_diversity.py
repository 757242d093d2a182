"""fastgen.eval.diversity and the collapse alarm on a student that gives one image per prompt."""

from __future__ import annotations

import itertools

import pytest
import torch

from fastgen.eval import (
    CollapseAlarm,
    CollapseConfig,
    degenerate_images,
    diversity_ratio,
    mean_pairwise_distance,
    vendi_score,
)


def _teacher_and_collapsed(prompts=3, seeds=5, dim=12):
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(prompts, seeds, dim, generator=g)
    collapsed = teacher[:, :1].expand(-1, seeds, -1).clone()  # one image whatever the seed
    return teacher, collapsed


def test_mean_pairwise_distance_matches_a_loop_over_pairs():
    teacher, _ = _teacher_and_collapsed()
    per_prompt = [
        torch.stack(
            [(f[i] - f[j]).double().norm() for i, j in itertools.combinations(range(5), 2)]
        ).mean()
        for f in teacher
    ]
    torch.testing.assert_close(mean_pairwise_distance(teacher), torch.stack(per_prompt).mean())


def test_collapsed_student_has_ratio_zero_and_vendi_one():
    teacher, collapsed = _teacher_and_collapsed()
    assert float(diversity_ratio(collapsed, teacher)) == 0.0
    assert float(diversity_ratio(teacher, teacher)) == 1.0
    torch.testing.assert_close(vendi_score(collapsed), torch.tensor(1.0, dtype=torch.float64))
    assert 3.0 < float(vendi_score(teacher)) <= 5.0  # 5 nearly orthogonal draws in 12 dims


def test_vendi_of_orthogonal_features_is_their_count():
    feats = torch.eye(4)[None].repeat(2, 1, 1) * torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None]
    torch.testing.assert_close(vendi_score(feats), torch.tensor(4.0, dtype=torch.float64))


def test_half_collapsed_student_sits_between():
    teacher, collapsed = _teacher_and_collapsed()
    half = torch.cat([teacher[:, :3], collapsed[:, :2]], dim=1)
    assert 0.0 < float(diversity_ratio(half, teacher)) < 1.0


def test_alarm_fires_on_the_collapsed_student_not_on_the_teacher():
    teacher, collapsed = _teacher_and_collapsed()
    config = CollapseConfig(threshold=0.5, patience=2)
    student_alarm, teacher_alarm = CollapseAlarm(config), CollapseAlarm(config)
    for _ in range(3):
        s = student_alarm.update(diversity_ratio(collapsed, teacher))
        t = teacher_alarm.update(diversity_ratio(teacher, teacher))
        assert not t["collapsed"]
    assert s["collapsed"] and s["streak"] == 3 and "below 0.5" in s["reason"]


def test_alarm_patience_resets_and_resumes_from_its_state():
    alarm = CollapseAlarm(CollapseConfig(threshold=0.5, patience=3))
    assert [alarm.update(r)["collapsed"] for r in (0.1, 0.2, 0.9, 0.1, 0.1)] == [False] * 5
    resumed = CollapseAlarm(alarm.config)
    resumed.load_state_dict(alarm.state_dict())
    assert resumed.update(0.1)["collapsed"] and resumed.history == [0.1, 0.2, 0.9, 0.1, 0.1, 0.1]
    assert resumed.update(float("nan"))["collapsed"]  # a NaN ratio is not healthy
    with pytest.raises(ValueError, match="streak and history"):
        resumed.load_state_dict({"streak": 1})


def test_alarm_fires_at_once_on_solid_or_non_finite_images():
    g = torch.Generator().manual_seed(1)
    healthy = torch.rand(4, 3, 8, 8, generator=g)
    solid = torch.full((4, 3, 8, 8), 0.5)
    nan = healthy.clone()
    nan[2, 0, 0, 0] = float("nan")
    config = CollapseConfig(patience=10)
    assert not CollapseAlarm(config).update(1.0, healthy)["collapsed"]
    report = CollapseAlarm(config).update(1.0, solid)
    assert report["collapsed"] and "4 of 4 images are solid-colour" in report["reason"]
    report = CollapseAlarm(config).update(1.0, nan)
    assert report["collapsed"] and "1 of 4 images are not finite" in report["reason"]
    non_finite, solid_mask = degenerate_images(torch.cat([healthy[:1], solid[:1], nan[2:3]]))
    assert non_finite.tolist() == [False, False, True] and solid_mask.tolist() == [
        False,
        True,
        False,
    ]


@pytest.mark.parametrize(
    ("student", "teacher", "match"),
    [
        (torch.zeros(2, 3, 4), torch.zeros(2, 4, 4), "differ in shape"),
        (torch.zeros(2, 1, 4), torch.zeros(2, 1, 4), "at least 2 seeds"),
        (torch.zeros(3, 4), torch.zeros(3, 4), r"\[prompts, seeds, D\]"),
    ],
)
def test_bad_features_are_named(student, teacher, match):
    with pytest.raises((ValueError, TypeError), match=match):
        diversity_ratio(student, teacher)


def test_collapse_config_is_strict():
    with pytest.raises(ValueError, match="threshold"):
        CollapseConfig(threshold=0.0)
    with pytest.raises(ValueError, match="patiense"):
        CollapseConfig(patiense=2)
