"""labeler: turns candidate sets into preference pairs (human, rules, reward model, LLM judge, imported)."""
