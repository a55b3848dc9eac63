"""User-turn prompts: the R1/Qwen math suffix, and the simple-evals template for multiple choice."""

from fp4reason.eval.data import Problem

MATH_SUFFIX = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."
CHOICE_TEMPLATE = (
    "Answer the following multiple choice question. The last line of your response should be of the "
    "following "
    "format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by step before "
    "answering.\n\n{question}\n\nA) {A}\nB) {B}\nC) {C}\nD) {D}"
)


def user_prompt(problem: Problem) -> str:
    """The user message for ``problem`` (the chat template is applied by the backend)."""
    if problem.kind == "choice":
        if len(problem.choices) != 4:
            raise ValueError(
                f"problem {problem.id}: multiple choice needs 4 options, has {len(problem.choices)}"
            )
        return CHOICE_TEMPLATE.format(
            question=problem.question, **dict(zip("ABCD", problem.choices, strict=True))
        )
    return problem.question.strip() + MATH_SUFFIX


def chat_text(tokenizer, user: str) -> str:
    """``user`` as one user turn through the tokenizer's chat template, ready for the assistant's reply;
    the raw text if the tokenizer has no template."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    return user
