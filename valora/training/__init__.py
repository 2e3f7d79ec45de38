"""Training on the Hugging Face model with PEFT, shared by `valora demo` and `valora adapters build`: what is
trained is saved in the formats any user would bring, and the engine serves it through its own loading code."""
