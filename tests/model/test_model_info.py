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
