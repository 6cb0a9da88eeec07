"""The Faust worker: the app built from settings, its topics and table, admission, output, HTTP pages."""
