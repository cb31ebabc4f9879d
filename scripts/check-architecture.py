#!/usr/bin/env python3
"""Architecture rules of src/ (issue 12), checked by tests/architecture.rs:

1. no import loop: the file-level import graph of src/ (every `use` and every
   inline `super::`/`crate::`/`self::` path in code, comments skipped,
   resolved to the file of the deepest module it names, names a mod.rs
   re-exports followed to the file that defines them) has no mutual pair and
   no cycle, leaving out the edges from a mod.rs (or x.rs) to its own
   children;
2. no domain folder imports the top-level config (the daemon hands each
   domain its own section);
3. no file under src/ is over 800 lines.

Usage: scripts/check-architecture.py [REPO]   (exit 1 with the findings)
"""
import os, re, sys
root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
src = os.path.join(root, 'src')
files = {}
for d, _, fs in os.walk(src):
    for f in fs:
        if f.endswith('.rs'):
            files[os.path.join(d, f)] = None

def modpath(path):
    rel = os.path.relpath(path, src)[:-3].split(os.sep)
    if rel[-1] in ('mod', 'lib', 'main'):
        rel = rel[:-1]
    return rel  # [] for lib.rs

def file_of(mp):
    # deepest existing module file for module path list mp
    for n in range(len(mp), -1, -1):
        base = os.path.join(src, *mp[:n]) if n else None
        cands = [base + '.rs', os.path.join(base, 'mod.rs')] if n else [os.path.join(src, 'lib.rs')]
        for c in cands:
            if c in files:
                return c
    return None

def strip_comments(text):
    out = []
    for line in text.split('\n'):
        s = line.lstrip()
        if s.startswith('//'):
            continue
        # drop trailing // comments (rough; our code has no // inside strings that matter)
        out.append(re.sub(r'(?<!:)//.*$', '', line))
    return '\n'.join(out)

def expand_use(body):
    # body like "super::{a, b::{C, D}, e}" -> list of paths
    body = body.strip()
    m = re.match(r'^([\w:]*?)\{(.*)\}$', body, re.S)
    if not m:
        return [body]
    prefix, inner = m.group(1), m.group(2)
    items, depth, cur = [], 0, ''
    for ch in inner:
        if ch == '{': depth += 1
        if ch == '}': depth -= 1
        if ch == ',' and depth == 0:
            items.append(cur); cur = ''
        else:
            cur += ch
    items.append(cur)
    out = []
    for it in items:
        it = it.strip()
        if not it: continue
        for p in expand_use(it):
            out.append(prefix + p)
    return out

# names a mod.rs re-exports from its children: (mod.rs, Name) -> child file
reexports = {}
for f in files:
    if os.path.basename(f) not in ('mod.rs', 'lib.rs'):
        continue
    me = modpath(f)
    for m in re.finditer(r'\bpub use\s+([^;]+);', strip_comments(open(f).read())):
        for p in expand_use(m.group(1)):
            segs = [x for x in re.sub(r'\s+as\s+\w+$', '', p.strip()).split('::') if x]
            if segs and segs[0] not in ('crate', 'super', 'self'):
                tgt = file_of(me + segs)
                if tgt and tgt != f:
                    reexports[(f, segs[-1])] = tgt

edges = {f: set() for f in files}
for f in files:
    me = modpath(f)
    # a file's own module path; a `mod tests;` child of x.rs lives at x/tests.rs
    text = strip_comments(open(f).read())
    paths = []
    for m in re.finditer(r'\buse\s+([^;]+);', text):
        paths += expand_use(m.group(1))
    for m in re.finditer(r'(?<![\w:])((?:super|crate|self)(?:::\w+)+)', text):
        paths.append(m.group(1))
    for p in paths:
        p = re.sub(r'\s+as\s+\w+$', '', p.strip())
        segs = [s for s in p.split('::') if s]
        if not segs or segs[0] not in ('super', 'crate', 'self'):
            continue
        if segs[0] == 'crate':
            mp, rest = [], segs[1:]
        else:
            mp = list(me)
            rest = segs
            while rest and rest[0] in ('super', 'self'):
                if rest[0] == 'super':
                    mp = mp[:-1]
                rest = rest[1:]
        rest = [s for s in rest if s not in ('self', '*')]
        tgt = file_of(mp + rest)
        if tgt and rest and (tgt, rest[-1]) in reexports:
            tgt = reexports[(tgt, rest[-1])]
        if tgt and tgt != f:
            edges[f].add(tgt)

def is_parent_decl(a, b):
    # a is mod.rs/lib.rs of a module that is b's parent (or ancestor)
    if os.path.basename(a) not in ('mod.rs', 'lib.rs'):
        return False
    pa, pb = modpath(a), modpath(b)
    return pb[:len(pa)] == pa and len(pb) > len(pa)

def is_parent_file(a, b):
    # x.rs is the parent of x/tests.rs
    pa, pb = modpath(a), modpath(b)
    return pb[:len(pa)] == pa and len(pb) > len(pa)

graph = {a: {b for b in bs if not is_parent_decl(a, b) and not is_parent_file(a, b)} for a, bs in edges.items()}
short = lambda p: os.path.relpath(p, root)
scope = sys.argv[2:] or ['src/']
pairs = set()
for a, bs in graph.items():
    for b in bs:
        if a in graph.get(b, ()):
            pairs.add(tuple(sorted((short(a), short(b)))))
# Tarjan
index, low, stack, on, sccs, i = {}, {}, [], set(), [], [0]
sys.setrecursionlimit(10000)
def sc(v):
    index[v] = low[v] = i[0]; i[0] += 1; stack.append(v); on.add(v)
    for w in graph[v]:
        if w not in index:
            sc(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v: break
        if len(comp) > 1:
            sccs.append(sorted(short(c) for c in comp))
for v in graph:
    if v not in index:
        sc(v)
problems = []
for p in sorted(pairs):
    problems.append(f"import loop: {p[0]} <-> {p[1]}")
for c in sccs:
    if len(c) > 2:
        problems.append("import cycle among: " + ", ".join(c))
DOMAINS = ('jobs', 'disk', 'mounts', 'setup', 'api', 'metrics', 'images', 'apps', 'lifecycle', 'access')
for f in sorted(files):
    rel = os.path.relpath(f, src)
    lines = open(f).read().count('\n')
    if lines > 800:
        problems.append(f"too long: {short(f)} has {lines} lines (at most 800)")
    if rel.split(os.sep)[0] in DOMAINS and re.search(r'\bcrate::config\b', strip_comments(open(f).read())):
        problems.append(f"domain imports the top-level config: {short(f)}")
for p in problems:
    print(p)
print(f"checked {len(files)} files: {len(problems)} problem(s)")
sys.exit(1 if problems else 0)
