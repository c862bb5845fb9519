"""The `hpc` entry point: verbs, --help with an example, one-line errors."""
from __future__ import annotations

import pytest

from hpc.cli import VERBS, build_parser

from helpers import run_hpc


def test_top_level_help_lists_every_verb():
    r = run_hpc("--help")
    assert r.returncode == 0
    for verb in VERBS:
        assert verb in r.stdout


def test_unknown_verb_fails():
    r = run_hpc("frobnicate")
    assert r.returncode == 2 and "frobnicate" in r.stderr


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_has_help_with_an_example(verb):
    parser, _ = build_parser(verb)
    text = parser.format_help()
    assert f"hpc {verb}" in text
    assert "example" in text.lower(), f"`hpc {verb} --help` should show an example"
