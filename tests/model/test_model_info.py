import json

import pytest

from services.cli import main


def test_model_info_reports_148_5m_parameters_for_the_reference_preset(capsys):
    assert main(["model-info", "--preset", "HybridDiT-148M"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == pytest.approx(148.5e6, rel=0.01)
    assert sum(info["modules"].values()) == info["params"]
    assert info["blocks"] == {"full_attention": 4, "linear_attention": 8}


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
