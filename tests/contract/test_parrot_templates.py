"""Building semantic programs: LangChain prompt templates become Parrot templates; bad programs are refused."""

from __future__ import annotations

import pytest

from chains.workloads.summarize import INITIAL_PROMPT, REFINE_PROMPT
from chains.workloads.summarize_parrot import build_refine_program
from langchain_energy.backends.base import SamplingParams
from langchain_energy.backends.parrot import prompt_call, template_placeholders
from langchain_energy.backends.parrot_program import SemanticProgram, to_parrot_template
from langchain_energy.errors import ConfigError, DataError

P = SamplingParams(max_tokens=8)


def test_fstring_fields_become_parrot_placeholders_and_escaped_braces_stay_text():
    assert to_parrot_template("Use {{braces}} and {x}.") == ("Use {braces} and {{x}}.", ["x"])
    body, names = to_parrot_template(REFINE_PROMPT)
    assert names == ["existing_summary", "text"]
    assert "{text}" not in body.replace("{{text}}", "")
    assert template_placeholders(body) == ["existing_summary", "text"]


@pytest.mark.parametrize("bad", ["{x!r}", "{x:>5}", "{x.y}", "{0}", "literal {{{{x}}}}"])
def test_fields_parrot_cannot_bind_are_refused(bad):
    with pytest.raises(ConfigError):
        to_parrot_template(bad)


def test_program_checks_inputs_against_fields_and_references():
    prog = SemanticProgram("p")
    with pytest.raises(ConfigError, match="placeholders without a parameter"):
        prog.call("a", "Hello {name}", {}, P)
    with pytest.raises(ConfigError, match="reserved"):
        prog.call("a", "Hello {output}", {"output": "x"}, P)
    a = prog.call("a", "Hello {name}", {"name": "x"}, P)
    with pytest.raises(ConfigError, match="used twice"):
        prog.call("a", "Hi", {}, P)
    other = SemanticProgram("q").call("z", "Z", {}, P)
    with pytest.raises(ConfigError, match="not an earlier call"):
        prog.call("b", "{prev}", {"prev": other}, P)
    prog.call("b", "{prev}", {"prev": a}, P)
    assert len(prog) == 2


def test_refine_program_chains_each_call_on_the_previous_output():
    prog = build_refine_program(["c1", "c2", "c3"], P)
    calls = prog._calls
    assert [c.ref.name for c in calls] == ["initial", "refine_1", "refine_2"]
    assert calls[0].prompt == INITIAL_PROMPT and calls[0].inputs == {"text": "c1"}
    assert calls[2].inputs == {"existing_summary": calls[1].ref, "text": "c3"}
    assert calls[2].template.endswith("{{output}}") and "{{existing_summary}}" in calls[2].template
    assert len(build_refine_program(["c"] * 10, P, max_calls=4)) == 4
    with pytest.raises(DataError):
        build_refine_program([], P)


def test_plain_prompts_become_constant_text_unless_they_look_like_placeholders():
    assert prompt_call("Tell me a joke.") == ("Tell me a joke.{{output}}", {})
    assert prompt_call("Render {{name}} literally") == ("{{prompt}}{{output}}", {"prompt": "Render {{name}} literally"})


def test_agentic_branches_hang_off_the_design_and_chain_within_each_module():
    from chains.workloads.agentic import calls_per_task, resolve_task
    from chains.workloads.agentic_parrot import build_branches_program

    task = resolve_task("snake")
    prog = build_branches_program(task, rounds=2, code=P, review=P)
    calls = {c.ref.name: c for c in prog._calls}
    # Everything but the integrator (submitted after, with client-side excerpts) is one DAG.
    assert len(prog) == calls_per_task(len(task["modules"]), 2) - 1
    design = calls["architect"].ref
    for m in task["modules"]:
        assert calls[f"engineer_{m}"].inputs["design"] == design
        assert calls[f"reviewer_{m}_1"].inputs["code"] == calls[f"engineer_{m}"].ref
        assert calls[f"final_{m}"].inputs["review"] == calls[f"reviewer_{m}_2"].ref
    assert len(build_branches_program(task, rounds=0, code=P, review=P)) == 1 + len(task["modules"])
