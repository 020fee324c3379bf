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


# --------------------------------------------------------------------------------------------
# Prompt set "v2" (default since the third drafter run): far more varied than v1, and two-stage.
#
# Stage 1 asks the teacher to *write material*: passages (articles, stories, reports, reviews,
# emails) and questions. Stage 2 builds prompts *from* that material: summarise / extract / answer
# from a passage (long prompts whose answers copy from the context, as in summarisation and RAG
# tasks), and answer the teacher's own questions (phrasings no template list has). Both stages'
# answers are training sequences. Everything is written for this project or by the teacher;
# still no external corpus and no Spec-Bench text.
# --------------------------------------------------------------------------------------------

MORE_TOPICS = [
    "the Mongol Empire", "penguins", "the human brain", "3D printing", "the Cold War", "soil erosion",
    "wolves", "the history of chocolate", "nuclear fusion", "the Eiffel Tower", "bicycles",
    "blockchain", "the Renaissance", "tsunamis", "the Maya civilisation", "sharks", "vitamins",
    "social media", "the Panama Canal", "composting", "the piano", "architecture in Japan",
    "electric guitars", "the theory of relativity", "cheese making", "elephants", "the Vikings",
    "smartphones", "the ozone layer", "tides", "volunteering", "ancient Greece", "photography",
    "the printing of books", "bees and pollination", "the North Pole", "space stations",
    "fermentation", "fire fighting", "the history of medicine", "weather forecasting",
    "self-driving cars", "the human skeleton", "opera", "the Sahara", "mushrooms", "lighthouses",
    "the Aztecs", "cloud computing", "basketball", "bamboo", "the Titanic", "probability",
    "sea turtles", "the postal service", "vaccination campaigns", "tea", "skyscrapers",
    "the Ottoman Empire", "cybersecurity", "board games", "the Nile", "wildfires", "comets",
    "the history of writing", "electricity", "languages of the world", "pottery", "trains",
    "inflation", "the brain and memory", "minimalism", "kangaroos", "the Hubble telescope",
    "the Black Death", "credit cards", "zoos", "the Himalayas", "olive oil", "dance",
    "the history of the bicycle", "graphene", "migration of whales", "the Dead Sea",
    "open source software", "public speaking", "the Industrial Revolution in Britain",
    "hydropower", "the history of film", "cats", "dogs", "horses", "rivers and floods",
    "the American Civil War", "the Great Depression", "algebra", "geometry", "statistics",
    "the rule of law", "human rights", "the United Nations", "entrepreneurship", "supply chains",
    "the job interview", "learning a new language", "child development", "ageing", "diabetes",
    "exercise and health", "the microbiome", "stem cells", "genetic engineering", "batteries",
    "lasers", "radio", "television", "the telephone", "satellites", "GPS", "the compass",
    "maps", "volcanic islands", "caves", "the Arctic", "Antarctica", "the Pacific Ocean",
    "camels", "ants", "spiders", "butterflies", "frogs", "owls", "trees in winter",
    "wine making", "rice farming", "the potato", "spices", "street food", "baking cakes",
    "vegetarian cooking", "food waste", "water purification", "air pollution", "noise",
    "city parks", "housing", "taxes", "banks", "insurance", "personal budgeting", "savings",
    "museums", "poetry", "novels", "fairy tales", "mythology", "the Olympic marathon",
    "football", "tennis", "swimming", "yoga", "hiking", "camping", "sailing", "astronomy",
    "telescopes", "the Big Bang", "exoplanets", "the Sun", "eclipses", "gravity", "magnets",
    "sound waves", "rainbows", "snowflakes", "clouds", "lightning", "the atom", "chemistry labs",
    "plastics", "glass", "steel", "concrete", "wood", "paper", "ink", "clocks", "calendars",
    "the abacus", "computers in the 1970s", "programming languages", "databases", "algorithms",
    "sorting", "recursion", "operating systems", "computer networks", "passwords",
    "artificial intelligence ethics", "video calls", "online shopping", "email etiquette",
]

NAMES = ["Anna", "Ben", "Carlos", "Dana", "Elif", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kira",
         "Liam", "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor",
         "Wen", "Yusuf", "Zoe"]

ITEMS = ["apples", "pencils", "books", "stickers", "cookies", "marbles", "tickets", "cupcakes",
         "notebooks", "flowers", "eggs", "bottles of water", "toy cars", "shirts", "plants"]

TEMPLATES_V2 = TEMPLATES + [
    # writing
    "Write a motivational speech for students who are nervous about {topic}.",
    "Write a short story in which a child discovers {topic}.",
    "Draft a formal letter to a city council proposing a project about {topic}.",
    "Write a haiku and a limerick about {topic}.",
    "Write a diary entry of someone who spends a day learning about {topic}.",
    "Write a catchy slogan and a short advertisement about {topic}.",
    "Write an engaging introduction for a podcast episode on {topic}.",
    # role play
    "Act as a scientist being interviewed on the radio about {topic}. Answer the host's first question.",
    "Imagine you are a character from the Middle Ages who suddenly hears about {topic}. Describe your reaction.",
    "You are a customer support agent. A customer asks for help with a problem related to {topic}. Respond politely.",
    "Role-play a debate between two friends who disagree about {topic}.",
    # reasoning
    "If a town doubled its spending on {topic}, what could the consequences be? Think it through.",
    "Compare {topic} and {topic2}: what do they have in common and how do they differ?",
    "A friend claims that {topic} is useless. How would you respond with evidence?",
    "Rank three possible ways to teach {topic} to adults, and justify the ranking.",
    # maths (GSM8K-like word problems with fresh numbers)
    "{name} has {a} {item}. {name} buys {b} packs with {c} {item} in each pack and gives away {d}. How many {item} does {name} have now?",
    "A train travels at {a}0 km per hour for {b} hours and then at {c}0 km per hour for {d} hours. How far does it travel in total?",
    "{name} earns {a}0 dollars a day and saves {b}0 percent of it. How much does {name} save in {n} days?",
    "A rectangle is {a} cm wide and {n} cm long. What are its area and perimeter?",
    "There are {n} students in a class. {b}0 percent of them like {topic}. How many students is that?",
    "{name} reads {a} pages on Monday and twice as many on Tuesday. The book has {n}0 pages. How many pages are left?",
    "What is {a} times {n}, minus {b}? Show each step.",
    "A recipe needs {a} eggs for {c} people. How many eggs are needed for {n} people?",
    "If 3 workers build a wall in {a} days, how long would {b} workers take at the same rate?",
    # coding
    "Write a Python function that reverses each word in a sentence and add two test cases.",
    "Write a JavaScript function that counts the vowels in a string.",
    "Write a SQL query that finds the {n} customers with the highest total orders.",
    "Write a Python script that reads a CSV file and prints the average of the column '{item}'.",
    "Implement binary search in Python and explain its time complexity.",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Write a C function that computes the factorial of a number iteratively.",
    "Explain the difference between a list and a tuple in Python, with examples.",
    "Write a Python function that computes the Fibonacci number {n} using memoisation.",
    "Find the bug in this code and fix it: `def mean(xs): return sum(xs) / len(xs) + 1`.",
    "Write a bash command that counts the lines of every .txt file in a folder.",
    "Write a Python class for a bank account with deposit and withdraw methods.",
    # extraction / STEM / humanities / QA
    "Give a step-by-step guide for a beginner who wants to get started with {topic}.",
    "Explain {topic} using an analogy a child would understand.",
    "What are the pros and cons of {topic}? Answer in two short lists.",
    "Who are some famous people associated with {topic}, and why?",
    "Describe the scientific principles behind {topic}.",
    "What might the future of {topic} look like in fifty years?",
    "Define {topic} in one sentence, then give an example.",
    "What questions should I ask an expert about {topic}?",
    "Write a quiz with four multiple-choice questions about {topic}, with answers.",
    "Explain the history of {topic} in chronological order.",
    "how does {topic} affect the environment",
    "what is the main difference between {topic} and {topic2}",
    "who invented or discovered {topic}",
]

PASSAGE_WRITERS = [
    "Write a short news article about {topic}.",
    "Write an encyclopedia-style paragraph about {topic}.",
    "Write a short story about {name} and {topic}.",
    "Write a report of about 150 words on recent developments in {topic}.",
    "Write an email from {name} to a colleague about a project on {topic}.",
    "Write a review of a book about {topic}.",
    "Write a short biography of a fictional expert on {topic} named {name}.",
    "Write a factual paragraph about {topic} that contains names, places and numbers.",
]

PASSAGE_TASKS = [
    "Summarize the following article in two or three sentences.\n\n{passage}",
    "Summarize the following text.\n\n{passage}",
    "{passage}\n\nWrite a one-sentence summary of the text above.",
    "Extract all the names, places and numbers mentioned in the text below, as a list.\n\n{passage}",
    "Read the passage and answer the question.\n\nPassage: {passage}\n\nQuestion: What is the passage mainly about?",
    "Answer the question using only the context.\nContext: {passage}\nQuestion: What does the context say about {topic}?",
    "Give the following text a title and list three key points.\n\n{passage}",
    "Rewrite the following text in simpler words for a young reader.\n\n{passage}",
    "Continue the following text with one more paragraph.\n\n{passage}",
    "Is the tone of this text positive, negative or neutral? Explain.\n\n{passage}",
    "Turn the following text into three questions with answers.\n\n{passage}",
    "Correct any grammar mistakes in this text and return the corrected text.\n\n{passage}",
]

QUESTION_WRITERS = [
    "Write one question that a curious student might ask about {topic}. Reply with the question only.",
    "Write a difficult question about {topic} that requires reasoning. Reply with the question only.",
    "Write a question someone might ask a chatbot about {topic}. Only write the question.",
    "Write a short maths word problem about {topic}. Only write the problem.",
    "Write a programming task related to {topic}. Only write the task.",
]

# Translation: sentences written for this project, combined at random (1-3 per prompt).
SENTENCES = {
    "German": [
        "Ich habe heute Morgen einen langen Spaziergang im Park gemacht.",
        "Die Regierung plant, im nächsten Jahr mehr Geld für Schulen auszugeben.",
        "Unser Zug hatte wegen des Schnees zwei Stunden Verspätung.",
        "Meine Schwester arbeitet als Ärztin in einem kleinen Krankenhaus.",
        "Das Museum zeigt eine neue Ausstellung über die Geschichte der Stadt.",
        "Wir wollen am Wochenende mit Freunden in die Berge fahren.",
        "Der Preis für Strom ist in den letzten Monaten stark gestiegen.",
        "Die Mannschaft hat das Spiel in der letzten Minute gewonnen.",
        "Kannst du mir bitte sagen, wo der Bahnhof ist?",
        "Forscher haben eine neue Art von Frosch im Regenwald entdeckt.",
        "Das Wetter wird morgen sonnig und warm.",
        "Die Firma hat im letzten Jahr dreihundert neue Mitarbeiter eingestellt.",
    ],
    "French": [
        "Nous avons visité un petit village au bord de la mer.",
        "Le gouvernement a annoncé de nouvelles mesures pour protéger l'environnement.",
        "Mon frère apprend à jouer du piano depuis trois ans.",
        "La réunion est reportée à jeudi prochain.",
        "Les enfants jouent dans le jardin pendant que nous préparons le dîner.",
        "Cette entreprise fabrique des vélos électriques depuis dix ans.",
        "Il pleut beaucoup en automne dans cette région.",
        "Le musée sera fermé pendant les travaux de rénovation.",
    ],
    "Spanish": [
        "Mañana vamos a cocinar una paella para toda la familia.",
        "El equipo científico publicó sus resultados la semana pasada.",
        "La biblioteca abre a las nueve de la mañana.",
        "Mi abuela vive en un pueblo pequeño cerca de las montañas.",
        "Los precios de las viviendas han subido mucho este año.",
        "El concierto empezó tarde porque llovía.",
    ],
}

TRANSLATION_TEMPLATES = [
    "Translate {lang} to English: {text}",
    "Translate the following {lang} text into English.\n\n{text}",
    "What does this {lang} sentence mean in English? {text}",
]


def _fill(rng: random.Random, template: str, topics: list[str], **extra) -> str:
    topic, topic2 = rng.sample(topics, 2)
    name = rng.choice(NAMES)
    return template.format(topic=topic, topic2=topic2, name=name, item=rng.choice(ITEMS),
                           n=rng.randint(3, 60), a=rng.randint(2, 19), b=rng.randint(2, 9),
                           c=rng.randint(2, 12), d=rng.randint(1, 9), **extra)


def _translation(rng: random.Random) -> str:
    lang = rng.choice(sorted(SENTENCES))
    text = " ".join(rng.sample(SENTENCES[lang], rng.randint(1, 3)))
    return rng.choice(TRANSLATION_TEMPLATES).format(lang=lang, text=text)


def build_prompt_plan(count: int, seed: int = 0) -> tuple[list[tuple[str, str]], list[str]]:
    """The v2 plan: ``(stage1, plain)``; stage 1 is ``(prompt, kind)`` with kind ``"passage"`` or
    ``"question"``, and :func:`derive_prompts` turns the teacher's answers into stage 2.

    Of ``count`` sequences: 1/6 passage writers, 1/12 question writers (each yields one stage-2
    prompt, so half the set is stage 1 + stage 2), 1/24 translation, the rest templates x topics.
    """
    rng = random.Random(seed)
    topics = TOPICS + MORE_TOPICS
    n_pass, n_q = count // 6, count // 12
    n_tr = count // 24
    n_plain = count - 2 * (n_pass + n_q) - n_tr
    seen: set[str] = set()

    def draw(n: int, make) -> list[str]:
        out, tries = [], 0
        while len(out) < n and tries < 50 * n + 100:
            tries += 1
            p = make()
            if p not in seen:
                seen.add(p)
                out.append(p)
        return out

    stage1 = [(p, "passage") for p in draw(n_pass, lambda: _fill(rng, rng.choice(PASSAGE_WRITERS), topics))]
    stage1 += [(p, "question") for p in draw(n_q, lambda: _fill(rng, rng.choice(QUESTION_WRITERS), topics))]
    plain = draw(n_tr, lambda: _translation(rng))
    plain += draw(max(n_plain, 0), lambda: _fill(rng, rng.choice(TEMPLATES_V2), topics))
    return stage1, plain


def derive_prompts(stage1: list[tuple[str, str]], answers: list[str], seed: int = 0) -> list[str]:
    """Stage 2: a task over each passage, or the teacher's own question asked back to it."""
    rng = random.Random(seed + 1)
    topics = TOPICS + MORE_TOPICS
    out = []
    for (prompt, kind), ans in zip(stage1, answers):
        ans = ans.strip()
        if kind == "question":
            lines = [x.strip().strip('"').strip() for x in ans.split("\n") if x.strip()]
            out.append((lines[0] if lines else prompt)[:600])
        else:
            topic = next((t for t in topics if t in prompt), rng.choice(topics))
            out.append(rng.choice(PASSAGE_TASKS).format(passage=ans[:2000], topic=topic))
    return out
