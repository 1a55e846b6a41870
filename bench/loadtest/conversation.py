"""Long-context chat load: users who share one long system prompt and hold conversations that grow every turn.

Each of the run's --concurrency users sends a turn, waits for the whole answer, and sends the next: the conversation
so far (the shared system prompt, every earlier message and answer) and a new user message. After --turns turns the
user starts a new conversation under the same system prompt. Every prompt then starts with the same
--system-prompt-len tokens, which a prefix cache holds once for all users, and each turn's prompt extends the one
before it, so a server that kept the conversation's blocks prefills only the answer and the new message; one that did
not prefills the whole context again, and its time to first token grows turn by turn.

The answer appended is all the text the server streamed, reasoning included, so a conversation grows by about
--output-len answer tokens and --input-len message tokens a turn whatever the model's channels. Messages are random
words like the random workload's prompts (workload.make_prompt), each from its own seed (seed, user, conversation,
turn): the same run sends the same messages, whatever order the users' turns interleave in.

With --system-prompts G the users are spread over G system prompts (user u holds prompt u % G), each its own
--system-prompt-len tokens: G prefixes for the cache to hold, each shared by about N/G users. On the responses endpoint
a later turn sends only its new message and the last response's id (`previous_response_id`); the server holds the
rest, and `messages` stays our own copy of the conversation, used for its token count. On the completions endpoint a
turn is the conversation as one plain-text transcript (`Turn.transcript`), each turn's transcript starting with the
one before it: the time to first token then counts no chat-template parsing (a random checkpoint's output never
forms a harmony header, and a chat stream holds such output back for the header's length before it streams).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from gptoss_serve.bench.loadtest.config import LoadConfig
from gptoss_serve.bench.loadtest.lengths import LengthSampler, samplers_for
from gptoss_serve.bench.loadtest.workload import make_prompt
from gptoss_serve.model.tokenizer import Tokenizer, load_tokenizer


@dataclass(frozen=True, slots=True)
class Turn:
    user: int
    conversation: int  # the user's 0-based count of conversations
    turn: int  # 1 for the first message of a conversation
    messages: list[dict[str, str]]
    prompt_len: int  # our count of the messages' tokens; a chat server adds its template around them
    output_len: int  # tokens asked for
    system_prompt: int | None = None  # which of the system prompts opens `messages` (None: no system prompt)
    previous_response_id: str | None = None  # responses endpoint: the answer this turn follows

    @property
    def transcript(self) -> str:
        """The conversation as one completions prompt: each message a paragraph under its role, ending where the
        answer starts, so that the next turn's transcript (this one, the answer, a new message) begins with it."""
        return "".join(f"{m['role']}: {m['content']}\n\n" for m in self.messages) + "assistant:"

    @property
    def instructions(self) -> str | None:
        return self.messages[0]["content"] if self.system_prompt is not None else None


@dataclass(slots=True)
class _Session:
    conversation: int
    messages: list[dict[str, str]]
    tokens: int  # prompt_len of the messages so far
    system_prompt: int | None
    turns: int = 0  # turns sent
    response_id: str | None = None  # the server's id of the last answer (responses endpoint)


class Conversations:
    """The users' conversations; `next_turn(user)` gives a user's next request, `answered` records its answer."""

    def __init__(self, *, tokenizer: Tokenizer, system_prompt_len: int, turns: int, input_lengths: LengthSampler,
                 output_lengths: LengthSampler, seed: int = 0, system_prompts: int = 1) -> None:
        self.tokenizer, self.turns, self.seed = tokenizer, turns, seed
        self.input_lengths, self.output_lengths = input_lengths, output_lengths
        self.system_prompt_len = system_prompt_len
        # prompt 0 has the seed a single-prompt run always had, so its prompt stays the same
        self.system_prompts = [make_prompt(tokenizer, system_prompt_len,
                                           random.Random(f"{seed}/system" + (f"/{g}" if g else "")))
                               for g in range(system_prompts)] if system_prompt_len else []
        self._sessions: dict[int, _Session] = {}
        self._started: dict[int, int] = {}  # user -> conversations started

    @classmethod
    def from_config(cls, config: LoadConfig, *, tokenizer: Tokenizer | None = None) -> Conversations:
        input_lengths, output_lengths = samplers_for(config)
        return cls(tokenizer=tokenizer or load_tokenizer(), system_prompt_len=config.system_prompt_len,
                   turns=config.turns, input_lengths=input_lengths, output_lengths=output_lengths, seed=config.seed,
                   system_prompts=config.system_prompts)

    def next_turn(self, user: int) -> Turn:
        """The user's next request; call it again only once `answered` has the answer to this one."""
        session = self._sessions.get(user)
        if session is None or session.turns == self.turns:
            session = self._sessions[user] = self._start(user)
        session.turns += 1
        rng = random.Random(f"{self.seed}/{user}/{session.conversation}/{session.turns}")
        message_len, output_len = self.input_lengths.draw(rng), self.output_lengths.draw(rng)
        session.messages.append({"role": "user", "content": make_prompt(self.tokenizer, message_len, rng)})
        session.tokens += message_len
        return Turn(user, session.conversation, session.turns, list(session.messages), session.tokens, output_len,
                    session.system_prompt, session.response_id)

    def answered(self, user: int, answer: str | None, *, response_id: str | None = None) -> None:
        """The answer to the user's last turn, or None if the turn failed: the user then starts a new conversation,
        as the one it held no longer matches what the server answered."""
        if answer is None:
            del self._sessions[user]
            return
        session = self._sessions[user]
        session.messages.append({"role": "assistant", "content": answer})
        session.tokens += len(self.tokenizer.encode(answer))
        session.response_id = response_id

    def _start(self, user: int) -> _Session:
        conversation = self._started.get(user, 0)
        self._started[user] = conversation + 1
        if not self.system_prompts:
            return _Session(conversation, [], 0, None)
        g = user % len(self.system_prompts)
        return _Session(conversation, [{"role": "system", "content": self.system_prompts[g]}], self.system_prompt_len, g)
