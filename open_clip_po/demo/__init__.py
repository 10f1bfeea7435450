"""The demo: a small synthetic world where PO removes a typographic vulnerability (issue 9).

Not yet built; this placeholder fails clearly so the README's first command says so.
"""
import sys


def main(argv=None) -> int:
    print("open_clip_po.demo is not built yet (the demo issue); run the tests with: bash scripts/run.sh test",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
