"""Exercises of lesson 09 (the inference service): consistent hashing, the cost of a token, stop strings."""
from typing import Any, Callable, Optional

from hypothesis import strategies as st

from minfer.lessons.registry import (Exercise, Inputs, against_definition, number_problem, register, returned,
                                     tuple_problem)


@st.composite
def _ring_inputs(draw) -> Inputs:
    points = sorted(draw(st.lists(st.integers(0, 99), min_size=1, max_size=8, unique=True)))
    owners = [draw(st.integers(0, 3)) for _ in points]
    key = draw(st.one_of(st.sampled_from(points), st.integers(0, 99)))
    return {"points": tuple(points), "owners": tuple(owners), "key": key}


def _ring_problem(inputs: Inputs, actual: Any) -> Optional[str]:
    """The owner of the first point at or after the key, by a linear scan (no such point: the first)."""
    points, key = inputs["points"], inputs["key"]
    i = next((i for i, p in enumerate(points) if p >= key), 0)
    if actual == inputs["owners"][i] and isinstance(actual, int):
        return None
    if actual is None:
        return returned(actual, "a replica number")
    wrapped = " (no point is >= the key: wrap around to the first point)" if points[-1] < key else ""
    return (f"the first point at or after key {key} is points[{i}] = {points[i]}{wrapped}, "
            f"owned by replica {inputs['owners'][i]}; yours is {actual!r}")


register(Exercise(
    name="router.ring_lookup",
    lesson="09_the_inference_service", function="ring_lookup",
    prelude="import bisect\nimport math\nimport torch\n",   # lesson 09 imports bisect in its first cell
    description="ring_lookup(points, owners, key) -> owners[i] for the first points[i] >= key, wrapping to 0",
    reference="minfer.serving.router:ring_lookup",
    inputs=_ring_inputs(),
    compare=against_definition(_ring_problem),
))


def _rate_and(name: str, hi: float) -> st.SearchStrategy:
    return st.builds(dict, tokens_per_s=st.floats(0.01, 1e5), **{name: st.floats(0.0, hi)})


def _per_mtok(what: str, formula: str, definition: Callable[[Inputs], float]):
    """A ``compare`` against ``definition(inputs)``, a number of ``what`` (``formula`` says how)."""
    def problem(inputs: Inputs, actual: Any) -> Optional[str]:
        want = definition(inputs)
        explain = f"{formula} = {want!r}; yours is {actual!r}"
        return number_problem(actual, want, f"a number of {what}", explain, abs_tol=1e-12)
    return against_definition(problem)


register(Exercise(
    name="cost.dollars_per_mtok",
    lesson="09_the_inference_service", function="dollars_per_mtok",
    description="dollars_per_mtok(tokens_per_s, price_per_hour) -> $ per million tokens",
    reference="minfer.serving.cost:dollars_per_mtok",
    inputs=_rate_and("price_per_hour", 100.0),
    compare=_per_mtok("dollars", "price_per_hour / (3600 * tokens_per_s) * 1e6",
                      lambda i: i["price_per_hour"] * 1_000_000 / (i["tokens_per_s"] * 3600)),
))

register(Exercise(
    name="cost.kwh_per_mtok",
    lesson="09_the_inference_service", function="kwh_per_mtok",
    description="kwh_per_mtok(tokens_per_s, watts) -> kWh per million tokens",
    reference="minfer.serving.cost:kwh_per_mtok",
    inputs=_rate_and("watts", 2000.0),
    compare=_per_mtok("kWh", "watts / 1000 * (1e6 / tokens_per_s) / 3600",
                      lambda i: i["watts"] * (1_000_000 / i["tokens_per_s"] / 3600) / 1000),
))


@st.composite
def _stream_inputs(draw) -> Inputs:
    text = st.text("ab.", max_size=8)
    before, added = draw(text), draw(st.text("ab.", min_size=1, max_size=4))
    stop = [s for s in draw(st.lists(st.text("ab.", min_size=1, max_size=3), max_size=2, unique=True))
            if s not in before]                          # the text streamed so far held no stop string
    hold = max((len(s) for s in stop), default=1) - 1
    emitted = draw(st.integers(0, max(0, len(before) - hold)))
    return {"text": before + added, "emitted": emitted, "stop": stop, "final": draw(st.booleans())}


def _stream_problem(inputs: Inputs, actual: Any) -> Optional[str]:
    text, emitted, stop, final = inputs.values()
    starts = [i for i in range(len(text)) for s in stop if text.startswith(s, i)]
    cut = text[:min(starts)] if starts else text
    longest = max((len(s) for s in stop), default=1)
    end = len(cut) if starts or final else max(emitted, len(cut) - (longest - 1))
    want = (cut, cut[emitted:end], bool(starts))
    problem = tuple_problem(actual, ("text", "new text to stream", "stopped"), of="values")
    if problem or tuple(actual) == want:
        return problem
    return (f"text {text!r}, {emitted} characters streamed, stop strings {stop}, final={final}: expected "
            f"{want}, yours {tuple(actual)!r}. Cut the text before the earliest stop string; stream "
            f"everything after the `emitted` characters except the last (longest stop - 1), which could be "
            f"the start of a stop string (all of it when the text was cut or is final)")


register(Exercise(
    name="output.stream_cut",
    lesson="09_the_inference_service", function="stream_cut",
    prelude="import bisect\nimport math\nimport torch\n",
    description=("stream_cut(text, emitted, stop, final) -> (text cut before the earliest stop string, the new "
                 "text safe to stream, stopped)"),
    reference="minfer.engine.output:stream_cut",
    inputs=_stream_inputs(),
    compare=against_definition(_stream_problem),
))
