"""langchain-tests 1.1.9 standard suites, wired to the embedded SmolLM2 model with honest capability flags.

Replies are kept short (`max_tokens`) so the integration suite fits the CPU budget; what the 135M model
cannot do is marked xfail one test at a time, with the reason.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_mplus import ChatMPlus

PARAMS: dict[str, Any] = {"max_tokens": 24}


class TestChatMPlusUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatMPlus

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False  # one local model per object; `model=` must name it


@pytest.mark.slow
class TestChatMPlusIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatMPlus

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return dict(PARAMS)

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False

    @pytest.mark.xfail(
        reason="tool_choice='auto': SmolLM2-135M answers in prose instead of deciding to call a tool; "
        "agents on this model should force calls with tool_choice",
        strict=False,
    )
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_agent_loop(self, model: BaseChatModel) -> None:
        super().test_agent_loop(model)
