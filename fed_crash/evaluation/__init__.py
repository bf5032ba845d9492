"""Evaluation: multiple-choice scoring, held-out loss and generation, the four-model report,
local offsite-tuning and the emulator comparison."""
