"""``purify-fast env``: which kernel backends are available, versions, and fixes for missing ones."""


def add_parser(sub):
    p = sub.add_parser("env", help="show available backends, versions, and how to fix missing ones")
    p.set_defaults(run=run)


def run(args) -> int:
    from purify_fast import backend

    print(f"purify_fast {__import__('purify_fast').__version__}")
    print(backend.describe())
    return 0
