"""LangChain integration of mplus_agents: a chat model that reads per-user latent memory, and a chat
history that writes conversation turns into it (see chat_models.py and history.py)."""

from langchain_mplus._shared import default_llm
from langchain_mplus.chat_models import ChatMPlus
from langchain_mplus.history import DEFAULT_WINDOW, MPlusChatMessageHistory
from langchain_mplus.tools import ToolRenderError, parse_tool_calls

__all__ = [
    "DEFAULT_WINDOW",
    "ChatMPlus",
    "MPlusChatMessageHistory",
    "ToolRenderError",
    "default_llm",
    "parse_tool_calls",
]
__version__ = "0.1.0"
