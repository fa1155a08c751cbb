"""work-it, the tutorials' app: a form takes an email and a thought, and a mail comes back."""
