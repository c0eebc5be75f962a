import logging

import pytest
import torch
from model_helpers import randomize_weights

from trainer.inheritance import inherit_weights, linear_attention_weights
from trainer.models import build_model


def inherit(student_preset: str, teacher_preset: str):
    teacher = randomize_weights(build_model(teacher_preset), seed=1)
    student = build_model(student_preset)
    fresh = {name: tensor.clone() for name, tensor in student.state_dict().items()}
    report = inherit_weights(student, teacher.state_dict())
    return report, student.state_dict(), teacher.state_dict(), fresh


@pytest.mark.parametrize(("student", "teacher"), [("LiT-tiny", "JointDiT-tiny"), ("LiT-T2I-tiny", "CrossDiT-tiny")])
def test_a_lit_student_inherits_every_weight_except_exactly_its_linear_attention(student, teacher):
    report, student_state, teacher_state, fresh = inherit(student, teacher)
    linear = {name for name in student_state if name.startswith("blocks.") and ".attn." in name}
    assert linear and set(report.skipped_linear_attention) == linear
    assert all(torch.equal(student_state[name], fresh[name]) for name in linear)
    assert sorted(report.loaded) == sorted(set(student_state) - linear)
    assert all(torch.equal(student_state[name], teacher_state[name]) for name in report.loaded)
    assert not report.missing_in_teacher and not report.shape_mismatch
    # the teacher's softmax self-attention (q/k/v/out; no conv on V) is all it keeps to itself
    assert report.unused_teacher == sorted({name for name in teacher_state if ".attn." in name})


def test_the_text_to_image_student_keeps_the_teachers_softmax_cross_attention():
    report, student_state, teacher_state, _ = inherit("LiT-T2I-tiny", "CrossDiT-tiny")
    cross = [name for name in student_state if ".cross." in name]
    assert len(cross) == 4 * 6  # in each of the 4 blocks: q, kv and proj, weight and bias (its norm has none)
    assert set(cross) <= set(report.loaded)
    assert all(torch.equal(student_state[name], teacher_state[name]) for name in cross)


def test_a_hybrid_student_inherits_its_softmax_anchors_and_leaves_only_linear_blocks_fresh():
    report, student_state, teacher_state, _ = inherit("HybridDiT-tiny", "HybridDiT-tiny")
    student = build_model("HybridDiT-tiny")
    linear_blocks = [i for i in range(student.config.depth) if not student.config.is_full_attention(i)]
    assert set(report.skipped_linear_attention) == {
        name for name in student_state if any(name.startswith(f"blocks.{i}.attn.") for i in linear_blocks)}
    assert set(report.skipped_linear_attention) == linear_attention_weights(student)
    anchors = [name for name in student_state if name.startswith("blocks.1.attn.")]  # block 1 is an anchor
    assert anchors and set(anchors) <= set(report.loaded)


def test_the_inheritance_report_is_logged_naming_every_fresh_tensor(caplog):
    with caplog.at_level(logging.INFO, logger="trainer.inheritance"):
        report, *_ = inherit("LiT-tiny", "JointDiT-tiny")
    logged = caplog.text
    assert f"inherited {len(report.loaded)} tensors" in logged
    assert all(name in logged for name in report.skipped_linear_attention)


def test_inheritance_reports_weights_the_teacher_lacks_or_shapes_differently():
    student = build_model("LiT-tiny")
    teacher_state = {name: t for name, t in build_model("JointDiT-tiny").state_dict().items() if "final" not in name}
    teacher_state["text_proj.weight"] = torch.zeros(3, 3)
    report = inherit_weights(student, teacher_state)
    assert "final.linear.weight" in report.missing_in_teacher
    assert report.shape_mismatch == ["text_proj.weight"]
