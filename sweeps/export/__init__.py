"""Export of a finished trial's adapter as a PEFT directory (optionally merged, optionally registered)."""
