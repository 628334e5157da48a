"""The in-process batching engine shared by every task of one worker."""
