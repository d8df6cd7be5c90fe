"""The quiet console: expected third-party messages are dropped by message and category or
logger, everything else still shows; gloo's healthy-connection lines are dropped from native
stdout and other lines kept; verbose turns the filters off."""

from __future__ import annotations

import logging
import os
import warnings

from megatron_elastic import console

HEALTHY = (
    b"[Gloo] Rank 3 is connected to 7 peer ranks. Expected number of connected peer ranks is : 7\n"
)
BROKEN = (
    b"[Gloo] Rank 3 is connected to 6 peer ranks. Expected number of connected peer ranks is : 7\n"
)


def test_expected_warnings_are_dropped_and_others_kept(monkeypatch) -> None:
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        console.quiet()
        warnings.warn(
            "Transformer Engine and Apex are not installed. Falling back", UserWarning, stacklevel=1
        )
        warnings.warn(
            "The argument order of load has been changed. Please", UserWarning, stacklevel=1
        )
        warnings.warn(
            "Transformer Engine and Apex are not installed", DeprecationWarning, stacklevel=1
        )
        warnings.warn("something the user should see", UserWarning, stacklevel=1)
    assert [(str(w.message), w.category) for w in seen] == [
        ("Transformer Engine and Apex are not installed", DeprecationWarning),
        ("something the user should see", UserWarning),
    ]


def test_expected_log_records_are_dropped_and_others_kept(monkeypatch, caplog) -> None:
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    console.quiet()
    logger = logging.getLogger("megatron.core.dist_checkpointing.strategies.torch")
    with caplog.at_level(logging.WARNING):
        logger.warning("MCore's async save is deprecated and will be removed")
        logger.warning("a real problem")
    assert [r.getMessage() for r in caplog.records] == ["a real problem"]


def test_gloo_healthy_lines_are_dropped_from_native_stdout(monkeypatch, capfd) -> None:
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    with console.drop_native_output():
        for line in (HEALTHY, b"our own line\n", BROKEN, HEALTHY):
            os.write(1, line)
    assert capfd.readouterr().out.encode() == b"our own line\n" + BROKEN
    os.write(1, HEALTHY)  # stdout is restored afterwards
    assert capfd.readouterr().out.encode() == HEALTHY
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    with console.drop_native_output():
        os.write(1, HEALTHY)
    assert capfd.readouterr().out.encode() == HEALTHY  # verbose: everything
