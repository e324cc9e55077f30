package org.fhirmatch.hapi;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.DefaultProfileValidationSupport;
import ca.uhn.fhir.rest.annotation.ResourceParam;
import ca.uhn.fhir.rest.annotation.Validate;
import ca.uhn.fhir.rest.api.EncodingEnum;
import ca.uhn.fhir.rest.api.MethodOutcome;
import ca.uhn.fhir.rest.server.IResourceProvider;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.exceptions.PreconditionFailedException;
import ca.uhn.fhir.validation.FhirValidator;
import ca.uhn.fhir.validation.ValidationResult;
import java.util.List;
import org.hl7.fhir.common.hapi.validation.support.CommonCodeSystemsTerminologyService;
import org.hl7.fhir.common.hapi.validation.support.InMemoryTerminologyServerValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.SnapshotGeneratingValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.ValidationSupportChain;
import org.hl7.fhir.common.hapi.validation.validator.FhirInstanceValidator;
import org.hl7.fhir.instance.model.api.IBaseResource;
import org.hl7.fhir.r5.model.Device;
import org.hl7.fhir.r5.model.Provenance;
import org.hl7.fhir.r5.model.ResearchSubject;

/**
 * {@code $validate} for the R5 shapes of what fhirmatch writes to an R5 server (ResearchSubject,
 * Provenance, Device), with the same instance validator and R5 core StructureDefinitions HAPI FHIR
 * uses. Validation only: nothing is stored. Served at {@code /fhir-r5}.
 */
final class R5Validation {

    private R5Validation() {}

    static RestfulServer server() {
        FhirContext ctx = FhirContext.forR5();
        ValidationSupportChain chain = new ValidationSupportChain(
                new DefaultProfileValidationSupport(ctx),
                new SnapshotGeneratingValidationSupport(ctx),
                new InMemoryTerminologyServerValidationSupport(ctx),
                new CommonCodeSystemsTerminologyService(ctx));
        FhirValidator validator = ctx.newValidator();
        validator.registerValidatorModule(new FhirInstanceValidator(chain));
        RestfulServer server = new RestfulServer(ctx);
        server.setDefaultResponseEncoding(EncodingEnum.JSON);
        server.setResourceProviders(List.of(
                new Provider(ResearchSubject.class, validator),
                new Provider(Provenance.class, validator),
                new Provider(Device.class, validator)));
        return server;
    }

    /** {@code POST [type]/$validate} for one resource type: the raw body is validated as sent. */
    public static final class Provider implements IResourceProvider {
        private final Class<? extends IBaseResource> type;
        private final FhirValidator validator;

        Provider(Class<? extends IBaseResource> type, FhirValidator validator) {
            this.type = type;
            this.validator = validator;
        }

        @Override
        public Class<? extends IBaseResource> getResourceType() {
            return type;
        }

        @Validate
        public MethodOutcome validate(@ResourceParam String body) {
            ValidationResult result = validator.validateWithResult(body);
            if (!result.isSuccessful()) {
                // as HAPI's JPA $validate does: 412 with the OperationOutcome
                throw new PreconditionFailedException("validation failed", result.toOperationOutcome());
            }
            MethodOutcome outcome = new MethodOutcome();
            outcome.setOperationOutcome(result.toOperationOutcome());
            return outcome;
        }
    }
}
