"""A terminal chat with latent memory in 30 lines of the Python API (what `mplus chat` does, minus options).

Run: `python examples/chat_cli.py [memory-file]` (default `chat.mplus` here). Type messages; an empty line or
Ctrl-D ends. Each message is answered with only that message in the prompt, then written into the model's
latent memory and saved, so the next run remembers it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mplus_agents import MPlusLLM
from mplus_agents.statefile import load_memory, save_memory


def main(path: Path) -> None:
    llm = MPlusLLM.from_default()
    memory = load_memory(llm, path) if path.exists() else llm.new_memory()
    print(f"{memory!r}  (empty line or Ctrl-D to quit)")
    while True:
        try:
            message = input("you> ").strip()
        except EOFError:
            break
        if not message:
            break
        print("bot> ", end="", flush=True)
        for piece in llm.chat(message, memory=memory, max_new_tokens=200, stream=True):
            print(piece, end="", flush=True)
        print()
        memory.inject(message, role="user")  # remember what the user said, after answering it
        save_memory(memory, path)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "chat.mplus"))
