"""The training prompt set: regenerable offline, disjoint from Spec-Bench by construction.

Provenance: every prompt is ``TEMPLATES[i].format(topic=TOPICS[j], n=..., a=..., b=...)`` with
the indices and numbers drawn from ``random.Random(seed)``. Both lists below were written for this
project (no external corpus, no Spec-Bench text); the template families mirror the *kinds* of
task a chat model meets (writing, role play, reasoning, maths, code, extraction, STEM,
humanities, translation, summarisation, question answering), not any benchmark's questions. The
teacher (the target model) then writes the answers (``python/ptp/train/data.py``), so the whole
training set is a deterministic function of (seed, count, model, sampling settings).
"""
from __future__ import annotations

import random

TOPICS = [
    "volcanoes", "the history of the printing press", "coral reefs", "black holes", "bread baking",
    "the Roman Empire", "electric cars", "honeybees", "the water cycle", "chess openings",
    "machine learning", "the French Revolution", "photosynthesis", "jazz music", "solar panels",
    "the immune system", "ancient Egypt", "climate change", "the stock market", "origami",
    "quantum computing", "the Silk Road", "sleep", "rainforests", "the human heart",
    "plate tectonics", "renaissance painting", "recycling", "the internet", "marathon training",
    "Mars exploration", "coffee", "the Olympic Games", "earthquakes", "vaccines", "bridges",
    "public libraries", "tea ceremonies", "the moon landing", "gardening", "prime numbers",
    "the Industrial Revolution", "octopuses", "wind energy", "meditation", "the printing of money",
    "glaciers", "video game design", "the periodic table", "Shakespeare", "urban planning",
    "the Great Wall of China", "dinosaurs", "cryptography", "nutrition", "hurricanes",
    "the theory of evolution", "remote work", "the violin", "antibiotics", "deserts", "robots",
    "the stock of a small bakery", "time management", "birds migrating", "microchips",
    "the Amazon river", "public transport", "democracy", "DNA", "the speed of light",
    "a city marathon", "first aid", "the Byzantine Empire", "knitting", "submarines",
]

TEMPLATES = [
    # writing
    "Write a short blog post about {topic}.",
    "Write a persuasive email to a friend encouraging them to learn about {topic}.",
    "Compose a short poem about {topic}.",
    "Write a product description for a museum exhibit on {topic}.",
    # role play
    "Pretend you are a tour guide. Introduce visitors to {topic}.",
    "You are a teacher. Explain {topic} to a class of ten-year-olds.",
    # reasoning
    "Give three arguments for and three against investing public money in {topic}.",
    "What would change in everyday life if {topic} had never existed? Reason step by step.",
    # math
    "A shop sells {n} items at {a} dollars each and gives a {b} percent discount. What is the total? Show your work.",
    "Solve for x: {a}x + {b} = {n}. Explain each step.",
    "What is the sum of the integers from 1 to {n}? Explain the method.",
    # coding
    "Write a Python function that returns the {n} most common words in a text, with a docstring.",
    "Write a Python function to check whether a number is prime, and explain how it works.",
    "Write a Python class representing a {topic} catalogue with add, remove and search methods.",
    "Explain what this Python code does: `sorted(set(x % {a} for x in range({n})))`.",
    # extraction / summarisation (the teacher supplies the content itself)
    "List five key facts about {topic} as a bulleted list.",
    "Summarise the main ideas of {topic} in one paragraph.",
    "Create a table with three columns (term, meaning, example) for words related to {topic}.",
    # STEM / humanities / QA
    "How does {topic} work? Give a clear explanation.",
    "What are the most important historical moments related to {topic}?",
    "Answer briefly: why is {topic} important?",
    "What are common misconceptions about {topic}?",
    # translation
    "Translate into French: 'I would like to learn more about {topic} this summer.'",
    "Translate into Spanish and explain the grammar: 'My friends talked about {topic} all evening.'",
]


def build_prompts(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct prompts (or all combinations, if fewer), deterministic in ``seed``."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    limit = len(TEMPLATES) * len(TOPICS) * 4
    while len(out) < count and len(seen) < limit:
        t = rng.randrange(len(TEMPLATES))
        p = TEMPLATES[t].format(topic=rng.choice(TOPICS), n=rng.randint(3, 60), a=rng.randint(2, 19),
                                b=rng.randint(5, 40))
        if p not in seen:
            seen.add(p)
            out.append(p)
        else:
            limit -= 1
    return out
