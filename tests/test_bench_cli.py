"""The benchmarks' command lines: a bad or unknown argument stops before any row runs.

bench/scaling.py once parsed sys.argv by hand, so ``--help`` (or a typo) silently started the
full width x batch table, about 10 minutes of work."""

import pytest

from bench import scaling


@pytest.mark.parametrize("argv, message", [
    (["--help"], "usage:"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--repeats", "2"], "--repeats and --only go with --levers"),
    (["--levers", "--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--dataset", "svhn"], "invalid choice: 'svhn'"),
    (["--levers", "--dataset", "mnist"], "not allowed with argument"),
])
def test_scaling_refuses_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        scaling.parse_args(argv)
    captured = capsys.readouterr()
    assert message in captured.out + captured.err


def test_scaling_levers_only_must_match_a_variant(monkeypatch):
    monkeypatch.setattr(scaling, "run", lambda spec: pytest.fail("a row ran"))
    with pytest.raises(SystemExit, match="--only 'zzz' matches no variant; the variants are: float32 eager"):
        scaling.main(["--levers", "--only", "zzz"])
    args = scaling.parse_args(["--levers"])
    assert args.levers and args.repeats == 3 and args.only is None
