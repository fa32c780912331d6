"""The agent's msgspec Structs (tickle.agentapi) and the task server's pydantic models
(tickle.messages) of the same bodies agree: the same fields, defaults and constraints, and a body
either side writes is read by the other as it was written. A field changed on one side only fails
here, so the two cannot drift apart.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from pydantic import BaseModel, ValidationError

from tickle import agentapi, messages

TASK = {"name": "t1", "command": ["echo", "hi"], "script": None, "timeout_s": 12.5}
SCRIPT = {"name": "t2", "command": None, "script": "echo hi", "timeout_s": 300.0}
POLICY = {
    "settings_version": 3, "task_request_interval_s": 600, "poll_jitter_fraction": 0.1,
    "cem": True, "long_poll": True, "long_poll_timeout_s": 30,
}  # fmt: skip
WORK = {"execution_id": 7, "computer": "pc1", "kind": "job", "steps": [TASK, SCRIPT],
        "expires_at": 1700000000.5}  # fmt: skip
EVENT = {
    "event_id": "0123456789abcdef", "execution_id": 7, "computer": "pc1", "kind": "finished",
    "at": 1700000001.25, "cached_at": 1700000001.5, "step": 1, "exit_code": -9,
    "status": "timed_out", "output_tail": "tail\n", "via": "long_poll", "stdout": "out\n",
    "stderr": "err\n", "step_started_at": 1700000000.75,
}  # fmt: skip
# every body the agent exchanges, each with every field set (optional ones too)
FULL: dict[str, dict[str, Any]] = {
    "TaskSpec": TASK,
    "ExecutionWork": WORK,
    "AgentPolicy": POLICY,
    "AgentRegister": {
        "enrollment_secret": "s3cret",
        "name": "pc1",
        "tickle_host": "10.0.0.5",
        "tickle_port": 50125,
        "cem": False,
        "reported_address": "10.0.0.5",
        "groups": ["web", "eu-1"],
        "identity": "x" * 32,
    },
    "AgentEnrollment": {
        "name": "pc1",
        "token": "tok",
        "tickle_key": "a2V5",
        "ts_name": "ts1",
        "policy": POLICY,
    },
    "AgentTasks": {"executions": [WORK], "policy": POLICY, "cancel": [4, 5]},
    "StatusEvent": EVENT,
    "EventBatch": {"events": [EVENT, {**EVENT, "event_id": "fedcba9876543210"}]},
    "EventAck": {"accepted": ["0123456789abcdef"]},
}
PAIRS = [(cls, getattr(messages, cls.__name__)) for cls in agentapi.EXCHANGED]
IDS = [cls.__name__ for cls in agentapi.EXCHANGED]


def test_every_exchanged_body_has_a_full_sample() -> None:
    assert sorted(FULL) == sorted(IDS)
    for struct, _ in PAIRS:
        assert set(FULL[struct.__name__]) == set(struct.__struct_fields__), struct.__name__


def _plain_schema(schema: dict[str, Any]) -> Any:
    """A JSON Schema with its $refs inlined and what only documents dropped (titles,
    descriptions); `default`s are compared by the round trips below."""
    defs = schema.get("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(n) for n in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            return walk(defs[node["$ref"].rsplit("/", 1)[1]])
        skip = {"title", "description", "default", "$defs"}
        if "enum" in node:  # pydantic adds the type of the values; msgspec sorts them
            skip.add("type")
            node = {**node, "enum": sorted(node["enum"])}
        return {k: walk(v) for k, v in node.items() if k not in skip}

    return walk(schema)


@pytest.mark.parametrize(("struct", "model"), PAIRS, ids=IDS)
def test_both_sides_have_the_same_fields_and_constraints(
    struct: type[agentapi.Body], model: type[BaseModel]
) -> None:
    assert _plain_schema(msgspec.json.schema(struct)) == _plain_schema(model.model_json_schema())


@pytest.mark.parametrize(("struct", "model"), PAIRS, ids=IDS)
def test_a_full_body_round_trips_both_ways(
    struct: type[agentapi.Body], model: type[BaseModel]
) -> None:
    body = FULL[struct.__name__]
    # the task server writes, the agent reads and writes it back, the task server reads it
    from_server = model.model_validate(body).model_dump_json()
    ours = agentapi.decode(from_server, struct)
    assert json.loads(agentapi.encode(ours)) == json.loads(from_server) == body
    assert model.model_validate_json(agentapi.encode(ours)) == model.model_validate(body)


@pytest.mark.parametrize(("struct", "model"), PAIRS, ids=IDS)
def test_the_defaults_agree(struct: type[agentapi.Body], model: type[BaseModel]) -> None:
    fields = msgspec.structs.fields(struct)
    full = FULL[struct.__name__]
    required = {f.name: full[f.name] for f in fields if f.required}
    if struct is agentapi.TaskSpec:  # one of command and script is needed
        required["command"] = full["command"]
    assert {f.name for f in fields if f.required} == {
        name for name, f in model.model_fields.items() if f.is_required()
    }
    ours = json.loads(agentapi.encode(agentapi.decode(json.dumps(required), struct)))
    assert ours == json.loads(model.model_validate(required).model_dump_json())


CHECKS = [
    ("TaskSpec", {"name": "t1"}),
    ("TaskSpec", {**TASK, "script": "echo"}),
    ("StatusEvent", {**EVENT, "stdout": "x" * agentapi.OUTPUT_MAX_CHARS, "stderr": "y"}),
    ("AgentRegister", {**FULL["AgentRegister"], "name": "-bad"}),
    ("AgentRegister", {**FULL["AgentRegister"], "unknown": 1}),
    ("EventBatch", {"events": [EVENT] * (agentapi.EVENT_BATCH_MAX + 1)}),
]


@pytest.mark.parametrize(("name", "body"), CHECKS, ids=[c[0] for c in CHECKS])
def test_both_sides_refuse_the_same_bodies(name: str, body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        getattr(messages, name).model_validate(body)
    with pytest.raises(msgspec.ValidationError):
        agentapi.decode(json.dumps(body), getattr(agentapi, name))


def test_an_event_without_its_output_is_the_same_on_both_sides() -> None:
    ours = agentapi.decode(json.dumps(EVENT), agentapi.StatusEvent).without_output()
    theirs = messages.StatusEvent.model_validate(EVENT).without_output()
    assert ours is not None
    assert theirs is not None
    assert json.loads(agentapi.encode(ours)) == json.loads(theirs.model_dump_json())
