"""Data: built-in data sets, local files and hub data sets, tokenised into train/validation splits."""
