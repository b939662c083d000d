"""The configuration field type of a listener's ``policy``: pydantic glue around
:func:`ferryman.policy.pplparse.parse_listener_policy`.

Owns: :data:`ListenerPolicyField` -- validation compiles the policy once, at load; a problem is
raised as a pydantic error *at its own key path* inside the policy, which pydantic prefixes with
the listener's location (``listeners[1].policy[1].deny.and[0].day_of_week``), so the
configuration loader names the key and its line like any other configuration error.
Serialisation gives the policy back as written.

Must not: evaluate policies or know about the rest of the configuration.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import PlainSerializer, PlainValidator
from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError

from ferryman.policy.ppl import ListenerPolicy
from ferryman.policy.pplparse import PolicyError, parse_listener_policy


def _compile(value: object) -> ListenerPolicy | None:
    if value is None or isinstance(value, ListenerPolicy):
        return value
    try:
        return parse_listener_policy(value)
    except PolicyError as exc:
        # Raised as a ValidationError (pydantic-core nests its errors under the field's
        # location); the message goes through the context so braces in it stay literal.
        error = PydanticCustomError("listener_policy", "{message}", {"message": exc.message})
        details = InitErrorDetails(type=error, loc=exc.path, input=value)
        raise ValidationError.from_exception_data("policy", [details]) from None


def _as_written(policy: ListenerPolicy | None) -> Any:
    return policy.source if policy is not None else None


ListenerPolicyField = Annotated[ListenerPolicy | None, PlainValidator(_compile), PlainSerializer(_as_written)]
"""A listener's ``policy`` (Pomerium Policy Language), compiled when the configuration loads;
``None`` when absent or empty."""
