"""Generates unidesk/events.py, the typed event payloads, from the CDDL.

    python3 clients/python/generate.py            # rewrite the module
    python3 clients/python/generate.py --check    # fail if it is out of step

Only the subset of CDDL that schemas/cddl/unidesk.cddl uses is read: rules
of maps with named members (`? name: type` optional), `* tstr => type`
maps, `[* type]` / `[+ type]` arrays, choices with `/`, text literals,
`bstr .size 16` for ids and rule names. Rules of event payloads and of the
hub's messages to nodes get a class each; the request/reply rules between
nodes and the main server are left out (they are no integration's business).
"""

import keyword
import pathlib
import re
import sys

HERE = pathlib.Path(__file__).resolve().parent
CDDL = HERE.parents[1] / "schemas" / "cddl" / "unidesk.cddl"
OUT = HERE / "unidesk" / "events.py"

# Rules whose payloads travel on subjects integrations read.
EVENT_PREFIXES = ("task-", "pipeline-", "schedule-", "node-", "token-", "secret-", "project-")
EXTRA_RULES = ("log-chunk", "disk-alert", "dispatch-run", "dispatch-cancel")

TOKEN = re.compile(r'\s*(=>|\.size|"[^"]*"|[A-Za-z_][A-Za-z0-9_\-]*|-?\d+|[{}\[\],:/?*+=()])')


def tokens(text):
    pos, out = 0, []
    text = text.strip()
    while pos < len(text):
        m = TOKEN.match(text, pos)
        if not m:
            raise SyntaxError(f"cannot read CDDL at: {text[pos:pos + 40]!r}")
        out.append(m.group(1))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


class Parser:
    """Types as tuples: ("name", n), ("lit", s), ("map", [members]),
    ("table", value_type), ("array", item_type), ("choice", [types])."""

    def __init__(self, toks):
        self.t, self.i = toks, 0

    def peek(self):
        return self.t[self.i] if self.i < len(self.t) else None

    def take(self, want=None):
        tok = self.peek()
        if want is not None and tok != want:
            raise SyntaxError(f"expected {want!r}, found {tok!r} in {' '.join(self.t)}")
        self.i += 1
        return tok

    def type(self):
        alts = [self.type1()]
        while self.peek() == "/":
            self.take("/")
            alts.append(self.type1())
        return alts[0] if len(alts) == 1 else ("choice", alts)

    def type1(self):
        tok = self.take()
        if tok == "{":
            return self.map()
        if tok == "[":
            if self.peek() in ("*", "+"):
                self.take()
            item = self.type()
            self.take("]")
            return ("array", item)
        if tok.startswith('"'):
            return ("lit", tok[1:-1])
        if self.peek() == ".size":
            self.take(".size")
            self.take()
        return ("name", tok)

    def map(self):
        members = []
        while self.peek() != "}":
            optional = False
            if self.peek() == "?":
                self.take("?")
                optional = True
            if self.peek() == "*":
                self.take("*")
                self.type1()  # the key type: always tstr here
                self.take("=>")
                value = self.type()
                if self.peek() == ",":
                    self.take(",")
                self.take("}")
                return ("table", value)
            key = self.take()
            key = key[1:-1] if key.startswith('"') else key
            self.take(":")
            members.append((key, self.type(), optional))
            if self.peek() == ",":
                self.take(",")
        self.take("}")
        return ("map", members)


def rules(text):
    text = re.sub(r";[^\n]*", "", text)
    found, name, body = {}, None, []
    for line in text.splitlines():
        m = re.match(r"^([a-z][a-z0-9_\-]*)\s*=(.*)$", line)
        if m:
            if name:
                found[name] = " ".join(body)
            name, body = m.group(1), [m.group(2)]
        elif name:
            body.append(line)
    if name:
        found[name] = " ".join(body)
    return {n: Parser(tokens(b)).type() for n, b in found.items()}


def class_name(rule):
    return "".join(p.capitalize() for p in re.split(r"[-_]", rule))


def field_name(key):
    return key + "_" if keyword.iskeyword(key) else key


class Generator:
    def __init__(self, parsed):
        self.rules = parsed
        self.classes = []  # (name, rule or None, members), in dependency order
        self.done = set()

    def wanted(self, rule):
        return rule.startswith(EVENT_PREFIXES) or rule in EXTRA_RULES

    def resolve(self, t):
        while (t[0] == "name" and t[1] in self.rules and t[1] not in ("uuid", "millis")
               and self.rules[t[1]][0] in ("name", "choice", "lit")):
            t = self.rules[t[1]]
        return t

    def pytype(self, t, owner, key):
        """(annotation, decoder, encoder): the coders are templates with `{}`
        standing for the value."""
        t = self.resolve(t)
        kind = t[0]
        same = "{}"
        if kind == "name":
            n = t[1]
            if n == "uuid":
                return "uuid.UUID", "uuid.UUID(bytes=bytes({}))", "{}.bytes"
            if n == "tstr":
                return "str", same, same
            if n in ("uint", "int", "millis"):
                return "int", same, same
            if n == "bool":
                return "bool", same, same
            if n == "bstr":
                return "bytes", "bytes({})", same
            if n == "any":
                return "Any", same, same
            body = self.rules.get(n)
            if body and body[0] == "map":
                self.add(class_name(n), n, body)
                return class_name(n), class_name(n) + ".from_cbor({})", "{}.to_cbor()"
            if body and body[0] in ("table", "array"):
                return self.pytype(body, owner, key)
            raise SyntaxError(f"{owner}.{key}: type {n} not understood")
        if kind == "lit":
            return "str", same, same
        if kind == "map":
            name = class_name(owner) + class_name(key.rstrip("s") or key)
            self.add(name, None, t)
            return name, name + ".from_cbor({})", "{}.to_cbor()"
        if kind == "array":
            a, d, e = self.pytype(t[1], owner, key)
            if d == same and e == same:
                return f"List[{a}]", "list({})", "list({})"
            return f"List[{a}]", "[" + d.format("x") + " for x in {}]", "[" + e.format("x") + " for x in {}]"
        if kind == "table":
            a, d, e = self.pytype(t[1], owner, key)
            if d == same and e == same:
                return f"Dict[str, {a}]", "dict({})", "dict({})"
            return (f"Dict[str, {a}]", "{{k: " + d.format("x") + " for k, x in {}.items()}}",
                    "{{k: " + e.format("x") + " for k, x in {}.items()}}")
        if kind == "choice":
            alts = [self.resolve(a) for a in t[1]]
            nullable = any(a == ("name", "null") for a in alts)
            rest = [a for a in alts if a != ("name", "null")]
            if all(a[0] == "lit" for a in rest):
                a, d, e = "str", same, same
            elif len(rest) == 1:
                a, d, e = self.pytype(rest[0], owner, key)
            else:
                raise SyntaxError(f"{owner}.{key}: a choice of {rest} not understood")
            if nullable:
                return f"Optional[{a}]", d, e
            return a, d, e
        raise SyntaxError(f"{owner}.{key}: {t} not understood")

    def add(self, name, rule, body):
        if name in self.done:
            return
        self.done.add(name)
        members = []
        for key, t, optional in body[1]:
            a, d, e = self.pytype(t, rule or name, key)
            members.append((key, a, d, e, optional))
        self.classes.append((name, rule, members))

    def run(self):
        for rule, body in self.rules.items():
            if self.wanted(rule) and body[0] == "map":
                self.add(class_name(rule), rule, body)
        return self.render()

    def render(self):
        out = [HEADER]
        for name, rule, members in self.classes:
            out.append("\n\n@dataclass")
            out.append(f"class {name}:")
            out.append(f'    """CDDL `{rule}`."""' if rule else f'    """A member of a map in the CDDL."""')
            out.append("")
            required = [m for m in members if not m[4]]
            optional = [m for m in members if m[4]]
            for key, a, _, _, _ in required:
                out.append(f"    {field_name(key)}: {a}")
            for key, a, _, _, _ in optional:
                ann = a if a.startswith("Optional[") else f"Optional[{a}]"  # absent: None
                out.append(f"    {field_name(key)}: {ann} = None")
            out.append("    extra: Dict[str, Any] = field(default_factory=dict)")
            out.append('    """Fields a newer producer added that this module does not know."""')
            out.append("")
            out.append("    @classmethod")
            out.append(f'    def from_cbor(cls, m: Dict[str, Any]) -> "{name}":')
            out.append("        m = dict(m)")
            out.append("        return cls(")
            for key, a, d, _, optional in members:
                f = field_name(key)
                if optional or a.startswith("Optional["):
                    get = f'm.pop("{key}", None)' if optional else f'_need(m, "{key}", "{name}")'
                    if d == "{}":
                        out.append(f"            {f}={get},")
                    else:
                        out.append(f"            {f}=_opt({get}, lambda v: {d.format('v')}),")
                else:
                    out.append(f"            {f}={d.format(repr_need(key, name))},")
            out.append("            extra=m,")
            out.append("        )")
            out.append("")
            out.append("    def to_cbor(self) -> Dict[str, Any]:")
            out.append("        m: Dict[str, Any] = {}")
            for key, a, _, e, optional in members:
                f = field_name(key)
                value = e.format(f"self.{f}")
                if optional:
                    out.append(f"        if self.{f} is not None:")
                    out.append(f'            m["{key}"] = {value}')
                elif a.startswith("Optional[") and e != "{}":
                    out.append(f'        m["{key}"] = None if self.{f} is None else {value}')
                else:
                    out.append(f'        m["{key}"] = {value}')
            out.append("        m.update(self.extra)")
            out.append("        return m")
        rule_names = sorted(r for _, r, _ in self.classes if r)
        out.append("\n\n# The class of each rule, by its CDDL name.")
        out.append("RULES: Dict[str, Any] = {")
        for r in rule_names:
            out.append(f'    "{r}": {class_name(r)},')
        out.append("}")
        return "\n".join(out) + "\n"


def repr_need(key, cls):
    return f'_need(m, "{key}", "{cls}")'


HEADER = '''"""Typed payloads of UniDesk's events, generated from
schemas/cddl/unidesk.cddl by clients/python/generate.py: do not edit.

Each class reads the CBOR map of one rule (`from_cbor`) and writes it back
(`to_cbor`); ids are `uuid.UUID`, times milliseconds since the epoch."""

# fmt: off
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


class MissingField(ValueError):
    """A payload lacks a field its rule requires."""


def _need(m: Dict[str, Any], key: str, cls: str) -> Any:
    if key not in m:
        raise MissingField(f"{cls}: no field {key!r}")
    return m.pop(key)


def _opt(v: Any, decode: Any) -> Any:
    return None if v is None else decode(v)'''


def main():
    text = Generator(rules(CDDL.read_text())).run()
    if "--check" in sys.argv[1:]:
        if not OUT.exists() or OUT.read_text() != text:
            sys.exit(f"{OUT} is out of step with {CDDL}: run python3 {pathlib.Path(__file__).name}")
        return
    OUT.write_text(text)


if __name__ == "__main__":
    main()
