import pytest

from matcher.cli import build_parser


@pytest.mark.parametrize("argv, quiet", [
    (["-q", "run", "--date", "2026-01-01"], True),
    (["run", "-q", "--date", "2026-01-01"], True),
    (["run", "--date", "2026-01-01"], False),
    (["demo", "--quiet"], True),
    (["query", "select 1", "-q"], True),
])
def test_quiet_is_taken_before_or_after_the_command(argv, quiet):
    assert build_parser().parse_args(argv).quiet is quiet
