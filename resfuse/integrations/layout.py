"""Verify the computation, not the text: a layer's ``forward`` read as a dataflow and matched
against the layout its table entry claims.

``resfuse.patch`` runs one generic forward per layout family (fused.py) in place of a
layer's own. That is only right if the layer's forward computes what its entry says. A
digest of the source text would refuse every release that renames an argument, adds a
keyword or a type hint; instead the forward's syntax tree is *interpreted symbolically*
(:func:`interpret`): every value is an expression over the layer's input stream, its other
arguments and its submodules' calls (``norm(stream)``, ``attn(...)[0]``, ``stream + f``...),
branches on arguments become conditional values, branches on the instance's own attributes
(``self.use_parallel_residual``) are decided by the instance. The stream the forward
returns must then peel, add by add from the last sublayer back to the input, into exactly
the sublayers of the entry (:func:`verify_chain`, :func:`verify_post_norm`):

* renamed variables, comments, docstrings, type hints, decorators, statement order that does
  not change the dataflow, arguments added to or renamed in the sublayer calls: accepted,
  and the calls are replayed as *this* release's code makes them (``Binding``: which
  layer arguments go to which sublayer, by which name);
* an extra operation on the stream or a branch (a scale, a clamp, a dtype cast, a branch on
  the activation's values), a sublayer more or less, another order, a submodule or method
  the entry does not know, an unsupported statement: refused, with the expression found
  and the one expected. Nothing is patched then (patching validates before it changes
  anything).

What the forward returns besides the stream (transformers 4.x layers return ``(hidden,)``
plus attention weights when asked) is kept as a template (``Verified.returns``) that the
generic forward fills in with the same values at run time.
"""

from __future__ import annotations

import ast
import copy
import inspect
import math
import textwrap
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from torch import nn

from .specs import Chain, PostNorm, Sublayer

# --------------------------------------------------------------------------- symbolic values


class Sym:
    """A symbolic value of the interpreted forward (immutable, compared structurally)."""


@dataclass(frozen=True)
class Stream(Sym):
    def __str__(self):
        return "stream"


@dataclass(frozen=True)
class Arg(Sym):
    name: str

    def __str__(self):
        return self.name


@dataclass(frozen=True)
class Const(Sym):
    value: Any

    def __str__(self):
        return repr(self.value)


@dataclass(frozen=True)
class SelfAttr(Sym):
    """A plain (non-module) attribute of the layer, e.g. a scale."""

    name: str

    def __str__(self):
        return f"self.{self.name}"


@dataclass(frozen=True)
class ModCall(Sym):
    """``self.<module>(*args, **kwargs)``; ``star``: the ``**`` mapping passed, if any."""

    module: str
    args: tuple
    kwargs: tuple  # ((name, Sym), ...)
    star: Optional[Sym] = None

    def __str__(self):
        parts = [str(a) for a in self.args] + [f"{k}={v}" for k, v in self.kwargs]
        if self.star is not None:
            star = str(self.star)
            parts.append(star if star.startswith("**") else f"**{star}")
        return f"{self.module}({', '.join(parts)})"


@dataclass(frozen=True)
class Item(Sym):
    of: Sym
    index: int

    def __str__(self):
        return f"{self.of}[{self.index}]"


@dataclass(frozen=True)
class Slice(Sym):
    of: Sym
    start: Optional[int]
    stop: Optional[int]

    def __str__(self):
        return f"{self.of}[{'' if self.start is None else self.start}:{'' if self.stop is None else self.stop}]"


@dataclass(frozen=True)
class Reshaped(Sym):
    """``x.view(y.shape)`` / ``x.reshape(y.shape)`` / ``x.view_as(y)``: x in y's shape (Llama 4's
    MoE returns (tokens, hidden) rows, viewed back as the residual before the add)."""

    of: Sym
    like: Sym

    def __str__(self):
        return f"{self.of}.view({self.like}.shape)"


@dataclass(frozen=True)
class IfTuple(Sym):
    """``x[index] if isinstance(x, tuple) else (x if index == 0 else default)`` of a module's
    output (MoE blocks that return a tuple in some releases:
    ``if isinstance(h, tuple): h, router_logits = h`` / ``else: router_logits = None``)."""

    of: Sym
    index: int = 0
    default: Any = None

    def __str__(self):
        return f"{self.of}[{self.index}] if it is a tuple"


@dataclass(frozen=True)
class Tup(Sym):
    items: tuple

    def __str__(self):
        return (
            "("
            + ", ".join(str(i) for i in self.items)
            + ("," if len(self.items) == 1 else "")
            + ")"
        )


@dataclass(frozen=True)
class Concat(Sym):
    """A tuple concatenation whose parts are not all known tuples (``(h,) + outputs[1:]``)."""

    parts: tuple

    def __str__(self):
        return " + ".join(str(p) for p in self.parts)


@dataclass(frozen=True)
class Add(Sym):
    a: Sym
    b: Sym

    def __str__(self):
        return f"({self.a} + {self.b})"


@dataclass(frozen=True)
class Mul(Sym):
    a: Sym
    b: Sym

    def __str__(self):
        return f"({self.a} * {self.b})"


@dataclass(frozen=True)
class Op(Sym):
    """Any other operation: its source text and its operands (kept for the messages)."""

    text: str
    operands: tuple = ()

    def __str__(self):
        return self.text


@dataclass(frozen=True)
class Cond(Sym):
    """A value that depends on a run-time condition of the layer's arguments."""

    test: str  # source text of the condition
    then: Sym
    other: Sym

    def __str__(self):
        return f"({self.then} if {self.test} else {self.other})"


@dataclass(frozen=True)
class Raises(Sym):
    """The path raises (an argument check)."""

    def __str__(self):
        return "<raises>"


@dataclass(frozen=True)
class Final(Sym):
    """In a return template: the stream the generic forward computed."""

    def __str__(self):
        return "stream"


class Refused(Exception):
    """The forward contains something the layout cannot express; the message says what."""


# --------------------------------------------------------------------------- the interpreter


@dataclass
class _Context:
    instance: nn.Module
    params: frozenset
    globals: dict
    static: dict = field(default_factory=dict)  # source of a decided test -> (code, value)
    tests: dict = field(default_factory=dict)  # source of a run-time test -> its code


def _source(node: ast.AST) -> str:
    return ast.unparse(node)


def _names(node: ast.AST) -> set:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _is_module_attr(ctx: _Context, name: str) -> bool:
    return isinstance(getattr(ctx.instance, name, None), nn.Module)


def _tuple_like(v: Sym) -> bool:
    return isinstance(v, (Tup, Concat, Slice))


def _concat(a: Sym, b: Sym) -> Sym:
    """``a + b``: a tuple concatenation when either side is a tuple (or a slice of one),
    else an addition."""
    if isinstance(a, Cond):
        return Cond(a.test, _concat(a.then, b), _concat(a.other, b))
    if isinstance(b, Cond):
        return Cond(b.test, _concat(a, b.then), _concat(a, b.other))
    if isinstance(a, Tup) and isinstance(b, Tup):
        return Tup(a.items + b.items)
    if _tuple_like(a) or _tuple_like(b):
        parts = []
        for v in (a, b):
            parts += list(v.parts) if isinstance(v, Concat) else [v]
        merged = []
        for p in parts:  # adjacent known tuples merge
            if merged and isinstance(p, Tup) and isinstance(merged[-1], Tup):
                merged[-1] = Tup(merged[-1].items + p.items)
            elif not (isinstance(p, Tup) and not p.items):
                merged.append(p)
        return merged[0] if len(merged) == 1 else Concat(tuple(merged))
    return Add(a, b)


def _item(v: Sym, i: int) -> Sym:
    if isinstance(v, Tup):
        if -len(v.items) <= i < len(v.items):
            return v.items[i]
        raise Refused(f"index {i} of the tuple {v}")
    if isinstance(v, Cond):
        return Cond(v.test, _item(v.then, i), _item(v.other, i))
    return Item(v, i)


def _slice(v: Sym, start, stop) -> Sym:
    if isinstance(v, Tup):
        return Tup(v.items[start:stop])
    if isinstance(v, Cond):
        return Cond(v.test, _slice(v.then, start, stop), _slice(v.other, start, stop))
    return Slice(v, start, stop)


def _const_int(node) -> Optional[int]:
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub)
        and isinstance(node.operand, ast.Constant)
    ):
        return -node.operand.value
    return None


def _eval(node: ast.AST, env: dict, ctx: _Context) -> Sym:
    if isinstance(node, ast.Name):
        if node.id in env:
            return env[node.id]
        return Op(node.id)  # a global (torch, math, a constant of the module)
    if isinstance(node, ast.Constant):
        return Const(node.value)
    if isinstance(node, ast.Attribute):
        if isinstance(node.value, ast.Name) and node.value.id == "self":
            if _is_module_attr(ctx, node.attr):
                return Op(f"self.{node.attr}")  # a module used other than by calling it
            return SelfAttr(node.attr)
        base = _eval(node.value, env, ctx)
        return Op(_source(node), (base,))
    if isinstance(node, ast.Call):
        return _eval_call(node, env, ctx)
    if isinstance(node, ast.BinOp):
        a, b = _eval(node.left, env, ctx), _eval(node.right, env, ctx)
        if isinstance(node.op, ast.Add):
            return _concat(a, b)
        if isinstance(node.op, ast.Mult):
            return Mul(a, b)
        return Op(_source(node), (a, b))
    if isinstance(node, ast.Subscript):
        v = _eval(node.value, env, ctx)
        if isinstance(node.slice, ast.Slice) and node.slice.step is None:
            start = _const_int(node.slice.lower) if node.slice.lower else None
            stop = _const_int(node.slice.upper) if node.slice.upper else None
            if (node.slice.lower is None or start is not None) and (
                node.slice.upper is None or stop is not None
            ):
                return _slice(v, start, stop)
        index = _const_int(node.slice)
        if index is not None:
            return _item(v, index)
        return Op(_source(node), (v,))
    if isinstance(node, (ast.Tuple, ast.List)):
        if any(isinstance(e, ast.Starred) for e in node.elts):
            return Op(_source(node))
        return Tup(tuple(_eval(e, env, ctx) for e in node.elts))
    if isinstance(node, ast.IfExp):
        kind = _test_kind(node.test, env, ctx)
        if kind == "static":
            branch = node.body if _static_value(node.test, ctx) else node.orelse
            return _eval(branch, env, ctx)
        if kind == "runtime":
            test = _runtime_test(node.test, ctx)
            return Cond(test, _eval(node.body, env, ctx), _eval(node.orelse, env, ctx))
        raise Refused(f"a conditional expression on the activation: `{_source(node)}`")
    return Op(
        _source(node),
        tuple(_eval(c, env, ctx) for c in ast.iter_child_nodes(node) if isinstance(c, ast.expr)),
    )


def _eval_call(node: ast.Call, env: dict, ctx: _Context) -> Sym:
    func = node.func
    if (
        isinstance(func, ast.Attribute)
        and isinstance(func.value, ast.Name)
        and func.value.id == "self"
    ):
        if not _is_module_attr(ctx, func.attr):
            raise Refused(
                f"it calls `self.{func.attr}(...)`, which is not a submodule (the layout only "
                "knows calls of submodules)"
            )
        args, kwargs, star = [], [], None
        for a in node.args:
            if isinstance(a, ast.Starred):
                raise Refused(f"`*` arguments in `{_source(node)}`")
            args.append(_eval(a, env, ctx))
        for kw in node.keywords:
            if kw.arg is None:
                if star is not None:
                    raise Refused(f"two `**` mappings in `{_source(node)}`")
                star = _eval(kw.value, env, ctx)
            else:
                kwargs.append((kw.arg, _eval(kw.value, env, ctx)))
        return ModCall(func.attr, tuple(args), tuple(kwargs), star)
    if isinstance(func, ast.Attribute) and len(node.args) == 1 and not node.keywords:
        arg = node.args[0]
        if (
            func.attr in ("view", "reshape")
            and isinstance(arg, ast.Attribute)
            and arg.attr == "shape"
        ):
            return Reshaped(_eval(func.value, env, ctx), _eval(arg.value, env, ctx))
        if func.attr in ("view_as", "reshape_as"):
            return Reshaped(_eval(func.value, env, ctx), _eval(arg, env, ctx))
    operands = tuple(_eval(a, env, ctx) for a in node.args if not isinstance(a, ast.Starred))
    operands += tuple(_eval(k.value, env, ctx) for k in node.keywords)
    if isinstance(func, ast.Attribute):
        operands = (_eval(func.value, env, ctx),) + operands
    return Op(_source(node), operands)


def _test_kind(test: ast.AST, env: dict, ctx: _Context) -> str:
    """``"static"`` (decided by the instance: its attributes, constants, module globals),
    ``"runtime"`` (depends on the layer's arguments or ``self.training``, not on computed
    values), or ``"activation"`` (depends on a value the forward computed)."""
    runtime = False
    for name in _names(test) - {"self"}:
        if name not in env:
            continue  # a module global
        value = env[name]
        if isinstance(value, Arg):
            runtime = True
        elif not isinstance(value, Const):
            return "activation"
    for node in ast.walk(test):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
            and node.attr == "training"
        ):
            runtime = True
    return "runtime" if runtime else "static"


def _static_value(test: ast.AST, ctx: _Context) -> bool:
    src = _source(test)
    if src not in ctx.static:
        code = compile(ast.Expression(test), "<layout test>", "eval")
        ctx.static[src] = (code, static_test(code, ctx.globals, ctx.instance, src))
    return ctx.static[src][1]


def static_test(code, module_globals: dict, instance, src: str = "") -> bool:
    """A test decided by the instance alone (``self.<attribute>``, constants, globals)."""
    try:
        return bool(eval(code, module_globals, {"self": instance}))
    except Exception as e:  # noqa: BLE001 - whatever fails, the layout cannot decide it
        raise Refused(f"cannot decide `{src}` for this instance: {type(e).__name__}: {e}") from None


def _runtime_test(test: ast.AST, ctx: _Context) -> str:
    """Record a test on the layer's arguments (and ``self``) as a function ``(self, bound)``
    of the bound arguments, for the return template at run time."""
    src = _source(test)
    if src not in ctx.tests:

        class _Bound(ast.NodeTransformer):
            def visit_Name(self, node):
                if node.id in ctx.params and node.id != "self":
                    key = ast.Constant(node.id)
                    return ast.copy_location(
                        ast.Subscript(ast.Name("__bound", ast.Load()), key, ast.Load()), node
                    )
                return node

        body = _Bound().visit(copy.deepcopy(test))
        args = ast.arguments([], [ast.arg("self"), ast.arg("__bound")], None, [], [], None, [])
        fn = ast.fix_missing_locations(ast.Expression(ast.Lambda(args, body)))
        ctx.tests[src] = eval(compile(fn, "<layout test>", "eval"), ctx.globals)
    return src


def _assign(target: ast.AST, value: Sym, env: dict) -> None:
    if isinstance(target, ast.Name):
        env[target.id] = value
    elif isinstance(target, (ast.Tuple, ast.List)):
        if any(isinstance(e, ast.Starred) for e in target.elts):
            raise Refused(f"starred assignment `{_source(target)}`")
        for i, e in enumerate(target.elts):
            _assign(e, _item(value, i), env)
    else:
        raise Refused(f"assignment to `{_source(target)}` (only local names are followed)")


def _first_if_tuple(stmt: ast.If, env: dict) -> bool:
    """The idiom ``if isinstance(h, tuple): h, extra = h`` (or ``h = h[0]``), with an optional
    ``else: extra = <constant>``, on a module's output: ``h`` and ``extra`` become IfTuple
    values of it."""
    test = stmt.test
    if len(stmt.body) != 1 or not isinstance(stmt.body[0], ast.Assign):
        return False
    if not (
        isinstance(test, ast.Call)
        and isinstance(test.func, ast.Name)
        and test.func.id == "isinstance"
        and len(test.args) == 2
        and isinstance(test.args[0], ast.Name)
        and isinstance(test.args[1], ast.Name)
        and test.args[1].id == "tuple"
    ):
        return False
    name = test.args[0].id
    value = env.get(name)
    if not isinstance(value, ModCall):
        return False
    defaults = {}
    for other in stmt.orelse:  # `else: router_logits = None`
        if not (
            isinstance(other, ast.Assign)
            and len(other.targets) == 1
            and isinstance(other.targets[0], ast.Name)
            and isinstance(other.value, ast.Constant)
        ):
            return False
        defaults[other.targets[0].id] = other.value.value
    assign = stmt.body[0]
    if len(assign.targets) != 1:
        return False
    target, source = assign.targets[0], assign.value
    if isinstance(target, ast.Name) and target.id == name:
        if not (
            isinstance(source, ast.Subscript)
            and isinstance(source.value, ast.Name)
            and source.value.id == name
            and _const_int(source.slice) == 0
        ):
            return False
        names = [name]
    elif isinstance(target, ast.Tuple) and isinstance(source, ast.Name) and source.id == name:
        names = [e.id if isinstance(e, ast.Name) else None for e in target.elts]
        if not names or names[0] != name or None in names:
            return False
    else:
        return False
    if set(defaults) - set(names[1:]):
        return False
    for i, other in enumerate(names[1:], start=1):
        if other in defaults:
            env[other] = IfTuple(value, i, defaults[other])
        else:  # no value when the output is not a tuple: unusable
            env[other] = Op(f"{other} (from a tuple that may not be one)")
    env[name] = IfTuple(value, 0)
    return True


_IGNORED_CALLS = ("warnings.warn", "logger.warning", "logger.warning_once", "logger.info")


def _run(stmts: list, env: dict, ctx: _Context, assumed: Optional[dict] = None) -> Sym:
    """The value the statements return from ``env`` (a Cond tree over run-time tests);
    ``assumed``: the run-time tests this path has already decided (a test met again on the
    same path takes the same branch)."""
    assumed = {} if assumed is None else assumed
    for i, stmt in enumerate(stmts):
        if isinstance(stmt, ast.Return):
            return _eval(stmt.value, env, ctx) if stmt.value is not None else Const(None)
        if isinstance(stmt, ast.Assign):
            value = _eval(stmt.value, env, ctx)
            for target in stmt.targets:
                _assign(target, value, env)
        elif isinstance(stmt, ast.AnnAssign):
            if stmt.value is not None:
                _assign(stmt.target, _eval(stmt.value, env, ctx), env)
        elif isinstance(stmt, ast.AugAssign):
            if not isinstance(stmt.target, ast.Name):
                raise Refused(f"`{_source(stmt)}`")
            current = env.get(stmt.target.id, Op(stmt.target.id))
            value = _eval(stmt.value, env, ctx)
            if isinstance(stmt.op, ast.Add):
                env[stmt.target.id] = _concat(current, value)
            elif isinstance(stmt.op, ast.Mult):
                env[stmt.target.id] = Mul(current, value)
            else:
                env[stmt.target.id] = Op(_source(stmt), (current, value))
        elif isinstance(stmt, ast.If) and _first_if_tuple(stmt, env):
            continue
        elif isinstance(stmt, ast.If):
            kind = _test_kind(stmt.test, env, ctx)
            rest = stmts[i + 1 :]
            if kind == "static":
                branch = stmt.body if _static_value(stmt.test, ctx) else stmt.orelse
                return _run(list(branch) + rest, env, ctx, assumed)
            if kind == "activation":
                raise Refused(f"a branch on the activation: `if {_source(stmt.test)}:`")
            test = _runtime_test(stmt.test, ctx)
            if test in assumed:
                branch = stmt.body if assumed[test] else stmt.orelse
                return _run(list(branch) + rest, env, ctx, assumed)
            then = _run(list(stmt.body) + rest, dict(env), ctx, {**assumed, test: True})
            other = _run(list(stmt.orelse) + rest, dict(env), ctx, {**assumed, test: False})
            if isinstance(then, Raises):
                return other
            if isinstance(other, Raises):
                return then
            return Cond(test, then, other)
        elif isinstance(stmt, ast.Raise):
            return Raises()
        elif isinstance(stmt, (ast.Pass, ast.Assert)):
            continue
        elif isinstance(stmt, ast.Expr):
            if isinstance(stmt.value, ast.Constant):
                continue  # a docstring
            if isinstance(stmt.value, ast.Call) and _source(stmt.value.func).startswith(
                _IGNORED_CALLS
            ):
                continue
            raise Refused(f"the statement `{_source(stmt)}`")
        else:
            raise Refused(
                f"a `{type(stmt).__name__.lower()}` statement: `{_source(stmt).splitlines()[0]}`"
            )
    return Const(None)


def _forward_tree(cls: type) -> tuple[ast.FunctionDef, dict]:
    fn = inspect.unwrap(cls.forward)
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError) as e:
        raise Refused(f"the source of {cls.__name__}.forward is not available: {e}") from None
    tree = ast.parse(source)
    node = tree.body[0]
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise Refused(f"{cls.__name__}.forward is not a function definition")
    return node, fn.__globals__


def interpret(cls: type, instance: nn.Module, stream: Optional[str] = None):
    """``(result, ctx, params)``: the symbolic value ``instance``'s forward (the code of
    ``cls``) returns; ``stream`` names the argument that is the residual stream (default:
    the first after ``self``)."""
    node, module_globals = _forward_tree(cls)
    params = [a.arg for a in node.args.posonlyargs + node.args.args][1:] + [
        a.arg for a in node.args.kwonlyargs
    ]
    if node.args.vararg is not None:
        raise Refused(f"{cls.__name__}.forward takes *{node.args.vararg.arg}")
    if not params:
        raise Refused(f"{cls.__name__}.forward takes no input")
    stream = stream if stream in params else params[0]
    env: dict = {p: Arg(p) for p in params}
    if node.args.kwarg is not None:
        env[node.args.kwarg.arg] = Arg("**" + node.args.kwarg.arg)
    env[stream] = Stream()
    ctx = _Context(instance, frozenset(env), module_globals)
    return _run(list(node.body), env, ctx), ctx, stream


# --------------------------------------------------------------------------- matching


@dataclass(frozen=True)
class Binding:
    """How this release's code calls one sublayer: the stream passed positionally (``None``)
    or by keyword; the other positional arguments and keywords, each from a layer argument
    (``("arg", name)``) or a constant (``("const", value)``); whether the layer's
    ``**kwargs`` go along; whether it takes the first item of the module's output."""

    input: Optional[str]
    args: tuple = ()
    kwargs: tuple = ()  # ((keyword, (kind, value)), ...)
    var_kwargs: bool = False
    # the branch output is the first item of what the module returns (True), or of it when it
    # is a tuple ("if_tuple")
    first: Union[bool, str] = False
    reshape: bool = False  # the branch output is viewed in the residual's shape before the add


@dataclass(frozen=True)
class Verified:
    """What the verified forward does, for the generic forward to replay: the binding of each
    sublayer's call (by module attribute), the return template (None: the stream), the
    run-time tests the template uses, the tests the instance decided, the stream's name."""

    bindings: tuple  # ((module attr, Binding), ...)
    returns: Optional[Sym] = None
    tests: tuple = ()  # ((source, code), ...) the run-time tests the template uses
    static: tuple = ()  # ((source, code, value), ...) the instance's decided tests
    stream: str = "hidden_states"

    def binding(self, module: str) -> Optional[Binding]:
        return dict(self.bindings).get(module)


def _source_of(v: Sym, params: frozenset):
    if isinstance(v, Arg) and not v.name.startswith("**"):
        return ("arg", v.name)
    if isinstance(v, Const):
        return ("const", v.value)
    return None


def _binding(
    call: ModCall, operand: Sym, sub: Sublayer, ctx: _Context, first, reshape: bool
) -> Binding:
    """The binding of ``call`` whose stream operand is ``operand``; Refused if some argument
    is neither a layer argument nor a constant."""
    where = f"the call of `{sub.module}`"
    positional = list(call.args)
    keywords = list(call.kwargs)
    if positional and positional[0] == operand:
        input_name, positional = None, positional[1:]
    else:
        names = [k for k, v in keywords if v == operand]
        if not names:
            raise Refused(f"{where} does not take the normalized stream: `{call}`")
        input_name = names[0]
        keywords = [(k, v) for k, v in keywords if k != input_name]
    args = []
    for v in positional:
        src = _source_of(v, ctx.params)
        if src is None:
            raise Refused(f"{where} passes `{v}`, which is neither a layer argument nor a constant")
        args.append(src)
    kwargs = []
    for k, v in keywords:
        src = _source_of(v, ctx.params)
        if src is None:
            raise Refused(
                f"{where} passes `{k}={v}`, which is neither a layer argument nor a constant"
            )
        kwargs.append((k, src))
    var_kwargs = False
    if call.star is not None:
        if not (isinstance(call.star, Arg) and call.star.name.startswith("**")):
            raise Refused(f"{where} passes `**{call.star}`")
        var_kwargs = True
    return Binding(input_name, tuple(args), tuple(kwargs), var_kwargs, first, reshape)


def call_text(binding: Binding) -> str:
    """A binding as the keywords it passes, for messages."""
    parts = [f"{k}={v}" for k, (_, v) in binding.kwargs]
    return ", ".join(parts + (["**kwargs"] if binding.var_kwargs else []))


def _peel_steps(branch: Sym, sub: Sublayer) -> Sym:
    """The module output under ``sub``'s steps (innermost first): Refused on a mismatch."""
    for attr, role in reversed(sub.steps):
        if role == "scale":
            if isinstance(branch, Mul) and SelfAttr(attr) in (branch.a, branch.b):
                branch = branch.b if branch.a == SelfAttr(attr) else branch.a
                continue
            raise Refused(
                f"expected `... * self.{attr}` on the {sub.module} branch, found `{branch}`"
            )
        if (
            isinstance(branch, ModCall)
            and branch.module == attr
            and len(branch.args) == 1
            and not branch.kwargs
        ):
            branch = branch.args[0]
            continue
        raise Refused(f"expected `{attr}(...)` on the {sub.module} branch, found `{branch}`")
    return branch


def _peel_sublayer(stream: Sym, sub: Sublayer, ctx: _Context, bindings: dict) -> Sym:
    """``stream`` = ``previous + steps(module(norm(previous)))``: returns ``previous``."""
    expected = f"stream + {sub.module}({sub.norm + '(stream)' if sub.norm else 'stream'})"
    if not isinstance(stream, Add):
        raise Refused(f"the add after `{sub.module}`: expected `{expected}`, found `{stream}`")
    problems = []
    for previous, branch in ((stream.a, stream.b), (stream.b, stream.a)):
        try:
            out = _peel_steps(branch, sub)
            reshape = isinstance(out, Reshaped) and out.like == previous
            if reshape:
                out = out.of
            first = False
            if (
                isinstance(out, Item)
                and out.index == 0
                and isinstance(out.of, ModCall)
                and out.of.module == sub.module
            ):
                out, first = out.of, True
            elif isinstance(out, IfTuple) and out.index == 0 and isinstance(out.of, ModCall):
                out, first = out.of, "if_tuple"
            if not (isinstance(out, ModCall) and out.module == sub.module):
                raise Refused(f"expected a call of `{sub.module}`, found `{out}`")
            if sub.norm is None:
                operand = previous
            else:
                operand = ModCall(sub.norm, (previous,), ())
            binding = _binding(out, operand, sub, ctx, first, reshape)
            if bindings.get(sub.module, binding) != binding:
                raise Refused(
                    f"the call of `{sub.module}` takes other arguments on another path of the "
                    f"forward (`{call_text(bindings[sub.module])}` / `{call_text(binding)}`)"
                )
            bindings[sub.module] = binding
            return previous
        except Refused as e:
            problems.append(str(e))
    raise Refused(
        f"the add after `{sub.module}`: expected `{expected}`, found `{stream}` ({problems[0]})"
    )


def _leaves(v: Sym, assumed: tuple = ()):
    """(assumptions, value) for each path of a Cond tree; assumptions: ((test, bool), ...)."""
    if isinstance(v, Cond):
        yield from _leaves(v.then, assumed + ((v.test, True),))
        yield from _leaves(v.other, assumed + ((v.test, False),))
    else:
        yield assumed, v


def _enabled(sub: Sublayer, assumed: tuple) -> Optional[bool]:
    """Whether a ``when`` sublayer runs on a path, from the path's tests on its argument."""
    for test, value in assumed:
        compact = test.replace(" ", "")
        if compact == f"{sub.when}isnotNone":
            return value
        if compact == f"{sub.when}isNone":
            return not value
    return None


def _check_template(v: Sym, sub_modules: set) -> None:
    """What a return template may hold: the stream, tuples and their concatenations, the
    raw outputs of the sublayer calls (and items and slices of any of these), layer
    arguments, constants, run-time choices."""
    if isinstance(v, (Final, Arg, Const)):
        return
    if isinstance(v, ModCall) and v.module in sub_modules:
        return
    if isinstance(v, (Tup, Concat)):
        for part in v.items if isinstance(v, Tup) else v.parts:
            _check_template(part, sub_modules)
        return
    if isinstance(v, Cond):
        _check_template(v.then, sub_modules)
        _check_template(v.other, sub_modules)
        return
    if isinstance(v, (Item, Slice, IfTuple)):
        _check_template(v.of, sub_modules)
        return
    raise Refused(f"it returns `{v}` besides the stream")


def verify_chain(cls: type, instance: nn.Module, spec: Chain) -> Verified:
    """Match ``instance``'s forward (the code of ``cls``) with the pre-norm layout ``spec``;
    raises Refused with the reason."""
    result, ctx, stream = interpret(cls, instance, spec.input)
    bindings: dict = {}
    templates = []
    streams = set()
    for assumed, value in _leaves(result):
        if isinstance(value, Raises):
            continue
        out = _first(value)
        active = []
        for sub in spec.sublayers:
            if sub.when is None:
                active.append(sub)
                continue
            if getattr(instance, sub.module, None) is None:
                continue  # absent on this instance (GPT-2 without cross-attention)
            enabled = _enabled(sub, assumed)
            if enabled is None:
                raise Refused(f"cannot tell on which paths `{sub.module}` runs")
            if enabled:
                active.append(sub)
        s = out
        for sub in reversed(active):
            s = _peel_sublayer(s, sub, ctx, bindings)
        if s != Stream():
            raise Refused(f"the first add starts from `{s}`, not from the layer input `{stream}`")
        streams.add(out)
        if isinstance(value, (Tup, Concat)):
            templates.append(assumed)
        elif value != out:
            raise Refused(f"it returns `{value}`")
    if not streams:
        raise Refused("every path of its forward raises")
    returns = None
    if templates:
        template = _rebuild(result, streams)
        _check_template(template, {s.module for s in spec.sublayers})
        returns = template
    return Verified(
        tuple(sorted(bindings.items())),
        returns,
        tuple(sorted(ctx.tests.items())) if returns is not None else (),
        _statics(ctx),
        stream,
    )


def _statics(ctx: _Context) -> tuple:
    return tuple((src, code, value) for src, (code, value) in sorted(ctx.static.items()))


def _first(v: Sym) -> Sym:
    """The stream a return value carries: itself, or the first item of a returned tuple."""
    if isinstance(v, Tup) and v.items:
        return v.items[0]
    if isinstance(v, Concat) and isinstance(v.parts[0], Tup) and v.parts[0].items:
        return v.parts[0].items[0]
    return v


def _rebuild(v: Sym, streams: set) -> Sym:
    """The return Cond tree with every verified stream expression replaced by Final."""
    if isinstance(v, Cond):
        return Cond(v.test, _rebuild(v.then, streams), _rebuild(v.other, streams))
    if v in streams:
        return Final()
    if isinstance(v, Tup):
        return Tup(tuple(Final() if i in streams else i for i in v.items))
    if isinstance(v, Concat):
        return Concat(tuple(_rebuild(p, streams) for p in v.parts))
    return v


def verify_post_norm(cls: type, instance: nn.Module, spec: PostNorm) -> Verified:
    """``return norm(steps(input) + residual)``; raises Refused with the reason."""
    result, ctx, stream = interpret(cls, instance, spec.input)
    branch = spec.input
    for attr in spec.steps:
        branch = f"{attr}({branch})"
    expected = f"{spec.norm}({branch} + {spec.residual})"
    if not (
        isinstance(result, ModCall)
        and result.module == spec.norm
        and len(result.args) == 1
        and not result.kwargs
    ):
        raise Refused(f"expected `return {expected}`, found `return {result}`")
    total = result.args[0]
    if not isinstance(total, Add):
        raise Refused(f"expected `return {expected}`, found `return {result}`")
    for branch, residual in ((total.a, total.b), (total.b, total.a)):
        if residual != Arg(spec.residual):
            continue
        b = branch
        for attr in reversed(spec.steps):
            if isinstance(b, ModCall) and b.module == attr and len(b.args) == 1 and not b.kwargs:
                b = b.args[0]
            else:
                b = None
                break
        if b == Stream():
            return Verified((), None, (), _statics(ctx), stream)
    raise Refused(f"expected `return {expected}`, found `return {result}`")


# --------------------------------------------------------------------------- run time


def evaluate(template: Sym, stream, outputs: dict, bound: dict, layer, tests: dict):
    """The value of a return template at run time: ``stream`` for Final, the raw outputs of
    the sublayer calls by module attribute, layer arguments, and the run-time tests as
    functions of (layer, bound arguments) (plain Python: torch.compile traces them)."""
    if isinstance(template, Final):
        return stream
    if isinstance(template, Const):
        return template.value
    if isinstance(template, Arg):
        return bound.get(template.name)
    if isinstance(template, ModCall):
        return outputs[template.module]
    if isinstance(template, Tup):
        return tuple(evaluate(i, stream, outputs, bound, layer, tests) for i in template.items)
    if isinstance(template, Concat):
        out = ()
        for part in template.parts:
            out = out + tuple(evaluate(part, stream, outputs, bound, layer, tests))
        return out
    if isinstance(template, Cond):
        branch = template.then if tests[template.test](layer, bound) else template.other
        return evaluate(branch, stream, outputs, bound, layer, tests)
    if isinstance(template, Item):
        return evaluate(template.of, stream, outputs, bound, layer, tests)[template.index]
    if isinstance(template, IfTuple):
        value = evaluate(template.of, stream, outputs, bound, layer, tests)
        if isinstance(value, tuple):
            return value[template.index]
        return value if template.index == 0 else template.default
    if isinstance(template, Slice):
        value = evaluate(template.of, stream, outputs, bound, layer, tests)
        return value[template.start : template.stop]
    raise TypeError(f"not a return template: {template}")  # verify_chain refused it


def scalar(value: Union[float, int]) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Refused(f"the branch scale {value!r} is not a finite number")
    return float(value)
