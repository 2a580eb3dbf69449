"""The helpdesk world the stages train and are measured in: its answer language (`grammar`), its prompts, answers and
noisy preference labels (`helpdesk`), the gold judge that scores any answer by its meaning (`gold_judge`), the
constitution the AI feedback model is asked and taught from (`constitution`, constitution.txt) and the files the
scripts read (`files`). The core modules of `nanoalign` import nothing from here: they train and score on any
data in the files' schemas; the scripts and the two stage entry points (nanoalign.evaluate, nanoalign.rlaif)
join them to the world."""
