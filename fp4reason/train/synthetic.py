"""Seeded multi-step arithmetic word problems with worked step-by-step traces (a small offline math set).

Each record is a trace (``prompt``, ``completion``) plus ``answer`` and ``targets``: the character spans in
the completion of every computed number (each ``= N`` result, the last one being the answer): the digit
tokens where FP4 hurts reasoning most. Train and held-out splits: different seeds, disjoint prompts.
"""

import random


def _problem(rng: random.Random) -> tuple[str, list[tuple[str, str | None]]]:
    """A prompt and its trace as segments ``(text, None)`` or ``(number, "target")``."""
    name = rng.choice(["Tom", "Ana", "Liam", "Mia", "Sara", "Ben"])
    item = rng.choice(["apples", "marbles", "stickers", "books", "coins", "cards"])
    a, b, c = rng.randint(12, 89), rng.randint(11, 59), rng.randint(2, 9)
    kind = rng.randrange(4)
    t = "target"
    if kind == 0:
        s, r = a + b, a + b - c
        prompt = f"{name} has {a} {item}, gets {b} more, then gives away {c}. How many {item} are left?"
        steps = [
            (f"{name} starts with {a} {item}.\nAfter getting {b} more: {a} + {b} = ", None),
            (str(s), t),
            (f".\nAfter giving away {c}: {s} - {c} = ", None),
            (str(r), t),
        ]
    elif kind == 1:
        s, r = a * c, a * c + b
        prompt = f"{name} buys {c} boxes of {a} {item} each and already had {b}. How many {item} now?"
        steps = [
            (f"{c} boxes of {a}: {c} * {a} = ", None),
            (str(s), t),
            (f".\nWith the {b} from before: {s} + {b} = ", None),
            (str(r), t),
        ]
    elif kind == 2:
        s, r = a + b, (a + b) * c
        prompt = f"A shelf holds {a} {item} on top and {b} below. How many {item} are on {c} such shelves?"
        steps = [
            (f"One shelf: {a} + {b} = ", None),
            (str(s), t),
            (f".\n{c} shelves: {c} * {s} = ", None),
            (str(r), t),
        ]
    else:
        s, r = a - c, (a - c) + b
        prompt = f"{name} had {a} {item}, lost {c}, then found {b}. How many {item} does {name} have?"
        steps = [
            (f"After losing {c}: {a} - {c} = ", None),
            (str(s), t),
            (f".\nAfter finding {b}: {s} + {b} = ", None),
            (str(r), t),
        ]
    steps += [(f".\nAnswer: {r}", None)]  # a copy of the last result: not a target
    return prompt, steps


def make_problems(n: int, seed: int, exclude: set[str] | None = None) -> list[dict]:
    """``n`` distinct problems (none of whose prompts is in ``exclude``) as trace records."""
    rng, out, seen = random.Random(seed), [], set(exclude or ())
    while len(out) < n:
        prompt, steps = _problem(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        text, targets = "", []
        for seg, kind in steps:
            if kind:
                targets.append((len(text), len(text) + len(seg)))
            text += seg
        out.append({"prompt": prompt, "completion": text, "answer": steps[-2][0], "targets": targets})
    return out


def make_splits(n_train: int, n_test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Disjoint train and held-out problem sets."""
    train = make_problems(n_train, seed)
    return train, make_problems(n_test, seed + 1_000_003, exclude={p["prompt"] for p in train})
