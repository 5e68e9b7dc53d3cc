"""`bigmodel info`: what was compiled, which CPU kernels run, and which ops have kernels where."""

from bigmodel.cli.main import main


def test_info_names_kernels_and_ops(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "CPU kernels: BIGMODEL_CPU_KERNEL=auto" in out
    for op in ("lstm_layer", "lstm_layer_backward", "attention", "attention_backward"):
        assert op in out


def test_info_reports_an_invalid_kernel_choice(monkeypatch, capsys):
    """A bad BIGMODEL_CPU_KERNEL is reported, not raised: info is what one runs to find out why."""
    monkeypatch.setenv("BIGMODEL_CPU_KERNEL", "bogus")
    assert main(["info"]) == 0
    assert "BIGMODEL_CPU_KERNEL=invalid" in capsys.readouterr().out
