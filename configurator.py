"""
The command line of the scripts: config as plain values (a script's defaults dict, then `config/<name>.py` files and
`--name=value` flags, in order), one-line errors, and the durations progress lines print.

    cfg, given = configure(sys.argv[1:], DEFAULTS, doc=__doc__, prog="train.py")

Each value is cast to the type of its default (bool from True/False, tuple from a,b,c, int, float, str); an
unknown key, a value of the wrong type or an unreadable config file ends the program with one line naming it
(exit 2). Config files hold `name = literal` lines (and a docstring) and are read with ast, never executed, so the
calling script stays importable and testable.

Reference: nanoGPT configurator.py (the same two override layers), without its exec.
"""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def fail(msg, prog="train.py"):
    """One line on stderr, exit 2 (a usage error)."""
    print(f"{prog}: error: {msg}", file=sys.stderr)
    sys.exit(2)


def cast(key, value, where, defaults, prog="train.py"):
    """A CLI string (or a config-file literal) as the type of the key's default."""
    if key not in defaults:
        fail(f"{where}: unknown config key {key!r}", prog)
    want = type(defaults[key])
    try:
        if isinstance(value, str) and want is not str:
            if want is bool:
                if value not in ("True", "False"):
                    raise ValueError
                value = value == "True"
            elif want is tuple:
                value = tuple(s.strip() for s in value.split(",") if s.strip())
            else:
                value = want(value)
        if want is float and type(value) is int:
            value = float(value)
        if want is tuple and isinstance(value, list):
            value = tuple(value)
        if type(value) is not want or (want is tuple and not all(isinstance(s, str) for s in value)):
            raise ValueError
    except ValueError:
        fail(f"{where}: {key}={value!r} is not a valid {want.__name__}", prog)
    return value


def read_config_file(path, defaults, prog="train.py"):
    """`name = literal` assignments (and a docstring) of a config file, without executing it -> {key: value}."""
    p = Path(path) if Path(path).exists() else ROOT / path
    if not p.is_file():
        fail(f"config file {path} not found", prog)
    try:
        tree = ast.parse(p.read_text(encoding="utf-8"), filename=str(p))
    except SyntaxError as e:
        fail(f"{p}:{e.lineno}: {e.msg}", prog)
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, NUL bytes
        fail(f"{p}: cannot read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", prog)
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            fail(f"{p}:{node.lineno}: only `name = literal` assignments are allowed", prog)
        try:
            value = ast.literal_eval(node.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            fail(f"{p}:{node.lineno}: the value of {node.targets[0].id} is not a literal", prog)
        out[node.targets[0].id] = cast(node.targets[0].id, value, f"{p}:{node.lineno}", defaults, prog)
    return out


def configure(argv, defaults, doc="", prog="train.py"):
    """Defaults, then config files (positional) and --name=value flags in order -> (cfg, the keys given)."""
    given = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(doc + "\nconfig keys and defaults:\n" + "\n".join(f"  --{k}={v!r}" for k, v in defaults.items()))
            sys.exit(0)
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                fail(f"{arg}: expected --name=value", prog)
            given[key] = cast(key, value, f"--{key}", defaults, prog)
        else:
            given.update(read_config_file(arg, defaults, prog))
    return {**defaults, **given}, given


def hms(s):
    """A duration for the progress lines: 1h02m, 4m05s."""
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def check(cfg, rules, prog="train.py"):
    """rules: [(keys, test, what)]: the first key whose value fails its test ends the program, naming the flag."""
    for keys, test, what in rules:
        for k in keys:
            if not test(cfg[k]):
                fail(f"--{k}={cfg[k]}: {what}", prog)
