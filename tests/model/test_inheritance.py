import torch
from model_helpers import randomize_weights

from trainer.inheritance import inherit_weights, is_attention_weight
from trainer.models import build_model


def test_linear_student_inherits_all_but_attention_weights_of_full_attention_teacher():
    teacher = randomize_weights(build_model("JointDiT-tiny"), seed=1)
    student = build_model("LiT-tiny")
    fresh = {name: tensor.clone() for name, tensor in student.state_dict().items()}
    report = inherit_weights(student, teacher.state_dict())
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    non_attention = [name for name in student_state if not is_attention_weight(name)]
    assert sorted(report.loaded) == sorted(non_attention)
    assert all(torch.equal(student_state[name], teacher_state[name]) for name in non_attention)
    assert report.skipped_attention and all(".attn." in name for name in report.skipped_attention)
    assert all(torch.equal(student_state[name], fresh[name]) for name in report.skipped_attention)
    assert not report.missing_in_teacher and not report.shape_mismatch
    assert set(report.unused_teacher) == {name for name in teacher_state if is_attention_weight(name)}


def test_inheritance_reports_weights_the_teacher_lacks_or_shapes_differently():
    student = build_model("LiT-tiny")
    teacher_state = {name: t for name, t in build_model("JointDiT-tiny").state_dict().items() if "final" not in name}
    teacher_state["text_proj.weight"] = torch.zeros(3, 3)
    report = inherit_weights(student, teacher_state)
    assert "final.linear.weight" in report.missing_in_teacher
    assert report.shape_mismatch == ["text_proj.weight"]
