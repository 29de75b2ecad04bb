"""``overlaybd serve``'s limit options: bad values give the usage error (exit 2) in one line, never a traceback."""

from __future__ import annotations

import pytest

from overlaybd.cli.main import main


@pytest.mark.parametrize("option, value, message", [
    ("--max-inflight", "abc", "not a size"),
    ("--max-inflight-total", "12Q", "not a size"),
    ("--max-connections", "many", "invalid int value"),
    ("--handshake-limit", "soon", "invalid float value"),
])
def test_unparsable_limits_are_usage_errors(option: str, value: str, message: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "vol", option, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("option, value, message", [
    ("--max-connections", "0", "max-connections must be at least 1, not 0"),
    ("--max-inflight", "0", "max-inflight must be at least 1, not 0"),
    ("--reply-timeout", "0", "reply-timeout must be a positive number of seconds"),
    ("--handshake-limit", "nan", "handshake-limit must be a positive number of seconds"),
])
def test_nonsense_limits_are_refused_before_anything_opens(option: str, value: str, message: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "no-such-volume", option, value]) == 2
    assert capsys.readouterr().err.strip() == f"overlaybd: error: {message}"
