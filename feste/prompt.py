"""TEMPORARY placeholder: being written."""



class LanguageMismatch(UserWarning):
    pass


class Prompt:
    pass


class FesteEnvironment:
    pass
