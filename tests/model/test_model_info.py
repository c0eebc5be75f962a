import json

import pytest

from services.cli import main


def test_model_info_reports_148_5m_parameters_for_the_reference_preset(capsys):
    assert main(["model-info", "--preset", "HybridDiT-148M"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == pytest.approx(148.5e6, rel=0.01)
    assert sum(info["modules"].values()) == info["params"]
    assert info["blocks"] == {"full_attention": 4, "linear_attention": 8, "cross_attention": 4}


@pytest.mark.parametrize(("preset", "depth"), [("LiT-T2I-B/2", 12), ("LiT-T2I-tiny", 4)])
def test_model_info_knows_lit_text_to_image_linear_self_attention_with_softmax_cross_attention(capsys, preset, depth):
    assert main(["model-info", "--preset", preset]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["blocks"] == {"full_attention": 0, "linear_attention": depth, "cross_attention": depth}
    assert info["block_parts"]["blocks.cross"] > 0 and info["config"]["text_drop_block"] == 0


def test_the_lit_text_to_image_student_has_its_teachers_parameters_but_a_lighter_attention(capsys):
    infos = {}
    for preset in ("CrossDiT-B/2", "LiT-T2I-B/2"):
        assert main(["model-info", "--preset", preset]) == 0
        infos[preset] = json.loads(capsys.readouterr().out)
    teacher, student = infos["CrossDiT-B/2"]["block_parts"], infos["LiT-T2I-B/2"]["block_parts"]
    assert {part: n for part, n in student.items() if part != "blocks.attn"} == {
        part: n for part, n in teacher.items() if part != "blocks.attn"}
    # the same q/k/v/out projections plus LiT's 5x5 depthwise conv on V: 768 x (25 + 1) more per block
    assert student["blocks.attn"] - teacher["blocks.attn"] == 12 * 768 * 26


def test_model_info_rejects_an_unknown_preset(capsys):
    with pytest.raises(SystemExit):
        main(["model-info", "--preset", "NoSuchDiT"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["HiDiT-B/2", "HiDiT-tiny"])
def test_model_info_knows_the_hidit_presets_and_counts_their_pixel_stream(capsys, preset):
    assert main(["model-info", "--preset", preset]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["pixel_stream"] and info["modules"]["pixel_stream"] > 0
    assert sum(info["modules"].values()) == info["params"]
