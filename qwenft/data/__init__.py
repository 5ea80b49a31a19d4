"""Chat datasets: read, check, convert, split, register, measure; nothing here prints or exits."""
