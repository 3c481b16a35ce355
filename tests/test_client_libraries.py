"""The structured-output client libraries people put in front of an OpenAI-compatible server get
validated objects through ours, each library unmodified, pointed at the server by base_url only:

- pydantic-ai's NativeOutput (OpenAIChatModel on an OpenAIProvider): a chat/completions
  response_format json_schema request, its answer validated into the pydantic model; on the real
  model (`--model smollm2`, SmolLM2-135M-Instruct's Q4_1 GGUF), greedy.
- The OpenAI Agents SDK (its default OpenAIResponsesModel, i.e. /v1/responses): an Agent whose
  output_type is a pydantic model (text.format json_schema) on the real model; and an Agent with one
  @function_tool run to the end: the model calls the tool (tool_choice "required"), the SDK runs it
  and sends its output back as a function_call_output item (tool_choice reset to auto), and the
  model's text answer is the run's final output. Tool calls are Mistral's [TOOL_CALLS] format (a
  chat template model such as SmolLM2 refuses tools: template_tokenizer.py), so that run is on a
  tiny Mistral V3 model whose sampler plays scripted answers (test_server_tools.py's Script).

- instructor (mode JSON_SCHEMA): the same request shape, its answer validated into the model. Every
  instructor release pins jiter<0.15 (1.17.0: rich<15 too) while openai 3.x needs jiter>=0.16, so
  pip cannot install it beside openai 3.x; .ci/run installs instructor==1.17.0 and tenacity
  --no-deps (it runs on the newer jiter and rich: this test is the proof).
"""

import json

import httpx2
import openai
import pytest
from pydantic import BaseModel, Field

from test_server_tools import Script, serving, tiny_v3

QUESTION = "What is the capital of France? Answer as JSON with the city, the country and whether it is a capital."


class Capital(BaseModel):
    city: str = Field(max_length=20)
    country: str = Field(max_length=20)
    is_capital: bool


@pytest.fixture(scope="module")
def smollm2():
    """The base URL of the server on SmolLM2 (in this process, as test_gguf_tokenizer's test serves it)."""
    with serving("smollm2", None) as (client, _):
        yield str(client.base_url)


def sane(answer: Capital) -> None:
    assert isinstance(answer, Capital)
    assert (answer.city, answer.country.lower(), answer.is_capital) == ("Paris", "france", True), answer


def test_pydantic_ai_native_output_gets_a_validated_object(smollm2):
    from pydantic_ai import Agent, NativeOutput
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel("tiny", provider=OpenAIProvider(base_url=smollm2, api_key="none"))
    agent = Agent(model, output_type=NativeOutput(Capital))
    result = agent.run_sync(QUESTION, model_settings={"temperature": 0, "max_tokens": 40})
    sane(result.output)


def test_instructor_json_schema_gets_a_validated_object(smollm2):
    import instructor

    client = instructor.from_openai(openai.OpenAI(base_url=smollm2, api_key="none", max_retries=0),
                                    mode=instructor.Mode.JSON_SCHEMA)
    answer = client.chat.completions.create(model="tiny", response_model=Capital, max_retries=0, temperature=0,
                                            max_tokens=40, messages=[{"role": "user", "content": QUESTION}])
    sane(answer)


def test_openai_agents_output_type_gets_a_validated_object(smollm2):
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, set_tracing_disabled

    set_tracing_disabled(True)  # no traces sent to api.openai.com
    client = openai.AsyncOpenAI(base_url=smollm2, api_key="none", max_retries=0)
    agent = Agent(name="geographer", model=OpenAIResponsesModel("tiny", client), output_type=Capital,
                  model_settings=ModelSettings(temperature=0, max_tokens=40))
    result = Runner.run_sync(agent, QUESTION)
    sane(result.final_output)


class Answers(Script):
    """Script's answers, one per request: each picker made plays the next one (then EOS only)."""

    def __init__(self, eos: int, *answers: list[int]):
        super().__init__(eos)
        self.answers = list(answers)

    def picker(self, *args, **kwargs):
        self.ids = self.answers.pop(0) if self.answers else [self.eos]
        return super().picker(*args, **kwargs)


def test_openai_agents_runs_a_function_tool_through_the_responses_api(tmp_path_factory):
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    path, tok, _ = tiny_v3(tmp_path_factory)
    call = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    script = Answers(tok.eos_id, [tok.tool_calls_id, *tok.encode(call), tok.eos_id],
                     [*tok.encode("Sunny in Paris."), tok.eos_id])
    ran, sent = [], []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        ran.append(city)
        return f"sunny in {city}"

    async def record(request):
        sent.append(json.loads(request.content))

    set_tracing_disabled(True)
    with serving(path, script) as (client, sched):
        aclient = openai.AsyncOpenAI(base_url=str(client.base_url), api_key="none", max_retries=0,
                                     http_client=httpx2.AsyncClient(event_hooks={"request": [record]}))
        agent = Agent(name="weather", instructions="Answer with the weather.", tools=[get_weather],
                      model=OpenAIResponsesModel("tiny", aclient),
                      # temperature > 0: every token is the script's (greedy would run the tiny model)
                      model_settings=ModelSettings(temperature=1, max_tokens=60, tool_choice="required"))
        result = Runner.run_sync(agent, "Weather in Paris?")
        stats = sched.stats()

    assert ran == ["Paris"] and result.final_output == "Sunny in Paris."
    assert [item.type for item in result.new_items] == ["tool_call_item", "tool_call_output_item", "message_output_item"]
    assert [r.get("tool_choice") for r in sent] == ["required", None]  # the SDK resets it after the call
    # the second request carries the call and its output; the model saw them (mistral-common's prompt of the same turns)
    fc, output = sent[1]["input"][1:]
    assert (fc["type"], fc["name"], json.loads(fc["arguments"])) == ("function_call", "get_weather", {"city": "Paris"})
    assert (output["type"], output["call_id"], output["output"]) == ("function_call_output", fc["call_id"], "sunny in Paris")
    tool = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                             "parameters": sent[0]["tools"][0]["parameters"]}}
    chat = [{"role": "system", "content": "Answer with the weather."}, {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": fc["call_id"], "type": "function", "function": {"name": "get_weather", "arguments": fc["arguments"]}}]},
            {"role": "tool", "tool_call_id": fc["call_id"], "content": "sunny in Paris"}]
    assert [r.usage.input_tokens for r in result.raw_responses] == \
        [len(tok.chat_tokens(chat[:2], tools=[tool])), len(tok.chat_tokens(chat, tools=[tool]))]
    assert (stats["tool_calls"], stats["stop"], stats["error"]) == (1, 1, 0)
